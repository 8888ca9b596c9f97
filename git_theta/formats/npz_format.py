"""placeholder until the npz format lands"""
from .base import CheckpointFormat
class NpzFormat(CheckpointFormat):
    name = "npz"
    def sniff(self, head, path):
        return False
