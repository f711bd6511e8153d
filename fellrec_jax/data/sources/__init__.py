"""Raw recommendation datasets -> one `Dataset` type, one module per format.

Readers: MovieLens (three file layouts), Amazon reviews (2018 and 2023 formats), the BIGRec/FELLRec
instruction JSON, and a synthetic generator (the built-in default, needs no files).

Every reader reads the item catalogue first and then the interactions line by line, so a bad line is
reported with its file and 1-based line number. `skip_bad_lines=True` turns such errors into counted,
logged skips; a missing file or a wrong header is always an error.
"""

from fellrec_jax.data.sources.amazon import read_amazon
from fellrec_jax.data.sources.bigrec_json import parse_titles, read_bigrec_json
from fellrec_jax.data.sources.dataset import DataError, Dataset
from fellrec_jax.data.sources.movielens import read_movielens
from fellrec_jax.data.sources.synthetic_data import synthetic
