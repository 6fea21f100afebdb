"""Studies: measurements that use every stage (analysis, editing, verification).

- ``world_mechanism``: does the demo model recall through a visible circuit (knockout, attribute
  rate, extraction heads over a sample of its facts);
- ``world_edits``: edit quality on the synthetic world, where every fact and template is known;
- ``known_edits``: CounterFact-style edit requests and scores from a real model's known facts;
- ``paper``: the Geva et al. (2023) study on a real model.
"""
