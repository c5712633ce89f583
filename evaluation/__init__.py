"""The evaluation library; ``evaluation_aclus.py`` is its command line."""
