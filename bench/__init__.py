"""``agent-runtime bench``: cancel-latency and capacity benchmarks of this API.

``bench cancel`` measures how fast a cancel stops a turn, against any server
that speaks the API (``--url``) or the runtime in-process (``--embedded``);
``bench compare`` sets two results side by side; ``bench sessions`` measures
what idle sessions and open streams cost. The command line is in
:mod:`bench._cli`; samples and options in :mod:`bench._samples`.
"""
