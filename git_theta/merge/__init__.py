"""Merge operators: how two or more versions of one tensor become one.

``operator`` defines the plugin interface (:class:`~git_theta.merge.operator.MergeOperator`,
:class:`~git_theta.merge.operator.Param`), ``params`` turns user strings into checked parameter
values, ``operators/`` holds the built-in operators (registered as ``git_theta.merge_operators``
entry points, like any third-party operator) and ``signals`` measures how two task vectors relate
and picks an operator for ``--operator auto``. Every operator works on one tensor at a time.
"""
