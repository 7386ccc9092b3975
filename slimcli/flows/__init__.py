"""Orchestration: what a command does, end to end, on files.

Each module here strings the library layers together for one job — prune a checkpoint
(:mod:`.prune`), inspect one (:mod:`.inspect`), the whole demo chain (:mod:`.demo`) — and
returns plain results for ``slimcli.cli`` to render. Nothing below this layer reads or writes
a run's files on its own initiative, and nothing here parses command lines.
"""
