"""Simulated vLLM model pod for tests, benchmarks and the local stack (``extproc-router sim``).

``simulator.server.start_sim`` runs one in-process; ``simulator.cli`` is the command line;
``simulator.engine`` holds the timing and admission model.
"""
