"""``vtpm-driver audit [--repair]``: this host's vTPM servers and what they left over.

* :mod:`.report`: the findings, pure (what is an orphan, a server's problems,
  half-done operations, off-host copies, what Nova vouches for).
* :mod:`.plan`: the repair plan, pure (what to remove or fix, what to leave
  and why).
* :mod:`.actions`: gather the facts and carry a plan out, over one host.
* :mod:`.orchestrator`: ask Nova which servers exist, where Nova runs.
"""
