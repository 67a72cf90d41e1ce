"""One debugging episode, in small parts the environment sequences.

* :mod:`.state` — :class:`~.state.Episode`: the task, the counters and what the last step
  showed;
* :mod:`.editor` — the file being fixed: edits, the indentation rule, a bounded undo history;
* :mod:`.grading` — syntax check, then the sandbox, then the judge (with retries);
* :mod:`.reward` — the potential-based shaping and the final reward;
* :mod:`.render` — the observation an agent sees.

Importing this package imports none of them.
"""
