"""The content-addressed object store: objects, containers, chunked objects, packs, caches."""
