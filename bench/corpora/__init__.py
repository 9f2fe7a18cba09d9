"""The retrieval-evaluation corpora that bench/eval_corpora.py builds: the parts they share, then one module each."""
