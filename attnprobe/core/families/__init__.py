"""One module per model family; each defines a :class:`attnprobe.core.family.Family` subclass.

Modules here are discovered by :func:`attnprobe.core.family.families`; nothing imports them by
name, so adding a family is adding a file.
"""
