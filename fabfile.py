"""`fab` looks for a module named fabfile: expose the kit's tasks from remote/."""

from remote.tasks import ns  # noqa: F401
