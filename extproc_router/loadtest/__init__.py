"""`extproc-router loadtest`: the load-test harness that measures routing quality.

It drives any OpenAI-compatible endpoint (our Envoy, a peer router, one pod) with seeded,
reproducible workloads, streams every request, and reports latency, throughput, load spread and
prefix-cache hit rate: the one the pods achieved and the one an ideal router would reach (the
oracle). ``--compare`` runs several routing arms back to back on the same requests.
"""
