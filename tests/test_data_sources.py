"""Readers on tiny files written in tmp_path: every format, and a clear DataError for each bad input."""

import gzip
import json

import numpy as np
import pytest

from fellrec_jax.data import DataError, partition, prepare_dataset, sources

MOVIES_CSV = 'movieId,title,genres\n1,Alpha (1999),Drama|Comedy\n2,"Beta, The (2001)",Horror\n3,Gamma (2003),Sci-Fi\n'
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.0,200\n2,3,5.0,150\n2,1,1.0,50\n"


def write(path, text, encoding="utf-8"):
  path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
  return path


def ml_dir(tmp_path, ratings=RATINGS_CSV, movies=MOVIES_CSV):
  write(tmp_path / "ratings.csv", ratings)
  if movies is not None:
    write(tmp_path / "movies.csv", movies)
  return tmp_path


# ---------------------------------------------------------------------------------------------- formats


def test_movielens_csv(tmp_path):
  ds = sources.read_movielens(ml_dir(tmp_path))
  assert ds.titles == ("Alpha (1999)", "Beta, The (2001)", "Gamma (2003)")
  assert ds.categories == ("Drama", "Horror", "Sci-Fi") and ds.item_noun == "movie"
  assert ds.user_keys == ("1", "2")
  np.testing.assert_array_equal(ds.item, [0, 1, 2, 0])
  np.testing.assert_array_equal(ds.timestamp, [100, 200, 150, 50])
  np.testing.assert_array_equal(ds.rating, [4, 3, 5, 1])


def test_movielens_100k_latin1(tmp_path):
  flags = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)
  write(tmp_path / "u.item", f"1|Caf\u00e9 (1995)|01-Jan-1995||http://x|{flags}\n2|Zed (1996)|||x|{flags}\n", "latin-1")
  write(tmp_path / "u.data", "10\t1\t4\t881250949\n10\t2\t3\t881250950\n")
  ds = sources.read_movielens(tmp_path)
  assert ds.titles == ("Caf\u00e9 (1995)", "Zed (1996)") and ds.categories == ("Comedy", "Comedy")
  np.testing.assert_array_equal(ds.timestamp, [881250949, 881250950])


def test_movielens_1m_dat(tmp_path):
  write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Comedy\n2::Se\u00f1or (1990)::Drama\n", "latin-1")
  write(tmp_path / "ratings.dat", "1::2::5::978300760\n1::1::3::978302109\n")
  ds = sources.read_movielens(tmp_path)
  assert ds.titles == ("Toy Story (1995)", "Se\u00f1or (1990)")
  np.testing.assert_array_equal(ds.item, [1, 0])


def test_amazon_2018_gz(tmp_path):
  with gzip.open(tmp_path / "Video_Games_5.json.gz", "wt") as f:
    for u, a, t in [("U1", "A1", 10), ("U1", "A2", 20), ("U2", "A1", 30)]:
      f.write(json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0}) + "\n")
  with gzip.open(tmp_path / "meta_Video_Games.json.gz", "wt") as f:
    f.write(json.dumps({"asin": "A1", "title": "Game One", "main_cat": "Video Games"}) + "\n")
    f.write(json.dumps({"asin": "A2", "title": "Game Two", "category": ["Video Games", "PC"]}) + "\n")
  ds = sources.read_amazon(tmp_path)
  assert ds.titles == ("Game One", "Game Two") and ds.categories == ("Video Games", "Video Games")
  assert ds.user_keys == ("U1", "U2")
  np.testing.assert_array_equal(ds.timestamp, [10, 20, 30])


def test_amazon_2023_jsonl(tmp_path):
  write(tmp_path / "Books.jsonl", "".join(
      json.dumps({"user_id": "u", "parent_asin": p, "timestamp": t, "rating": 4.0}) + "\n"
      for p, t in [("P1", 1_600_000_000_123), ("P2", 1_600_000_100_000)]))
  write(tmp_path / "meta_Books.jsonl", json.dumps({"parent_asin": "P1", "title": "B1", "main_category": "Books"})
        + "\n" + json.dumps({"parent_asin": "P2", "title": "B2", "main_category": "Books"}) + "\n")
  ds = sources.read_amazon(tmp_path)
  np.testing.assert_array_equal(ds.timestamp, [1_600_000_000, 1_600_000_100])  # ms -> s
  assert ds.titles == ("B1", "B2")


def bigrec_record(user, history, target):
  return {"instruction": "Given ...", "input": "The user has played the following games before: "
          + ", ".join(f'"{t}"' for t in history), "output": f'"{target}"\n', "user": user}


def test_bigrec_json_import(tmp_path):
  write(tmp_path / "train.json", json.dumps([bigrec_record("a", ["X", "Y"], "Z"), bigrec_record("b", ["Y"], "X"),
                                             bigrec_record("c", ["Z"], "Y")]))
  write(tmp_path / "valid.json", json.dumps([bigrec_record("a", ["Y", "Z"], "W")]))
  write(tmp_path / "test.json", json.dumps([bigrec_record("a", ["Z", "W"], "V"), bigrec_record("b", ["X"], "Z")]))
  prep, stats = prepare_dataset("bigrec_json", tmp_path, num_clients=2, partition="random")
  t = {title: i for i, title in enumerate(prep.titles)}
  assert set(t) == {"X", "Y", "Z", "W", "V"} and stats["split"] == "given"
  assert prep.train.text[0]["output"] == '"Z"\n'  # verbatim
  np.testing.assert_array_equal(prep.train.target, [t["Z"], t["X"], t["Y"]])
  a = prep.dataset.user_keys.index("a")
  np.testing.assert_array_equal(prep.split.test_targets[a], [t["V"]])
  np.testing.assert_array_equal(prep.split.valid_history[a], [t["Y"], t["Z"]])
  assert sum(c["test_users"] for c in stats["clients"]) == 2


# ---------------------------------------------------------------------------------------------- errors


def test_missing_titles_file(tmp_path):
  with pytest.raises(DataError, match=r"missing file: .*movies\.csv"):
    sources.read_movielens(ml_dir(tmp_path, movies=None))


def test_missing_directory_and_ratings(tmp_path):
  with pytest.raises(DataError, match="missing data directory"):
    sources.read_movielens(tmp_path / "nope")
  with pytest.raises(DataError, match="no MovieLens ratings file"):
    sources.read_movielens(tmp_path)


def test_wrong_columns(tmp_path):
  d = ml_dir(tmp_path, ratings="user,item,rating,timestamp\n1,1,4.0,100\n")
  with pytest.raises(DataError, match=r"ratings\.csv, line 1: wrong columns"):
    sources.read_movielens(d)


def test_malformed_line_and_skip(tmp_path):
  d = ml_dir(tmp_path, ratings=RATINGS_CSV + "3,1\n3,2,4.0,notatime\n")
  with pytest.raises(DataError, match=r"ratings\.csv, line 6: expected 4 fields, got 2"):
    sources.read_movielens(d)
  assert sources.read_movielens(d, skip_bad_lines=True).num_interactions == 4


@pytest.mark.parametrize("line, message", [
    ("3,2,4.0,notatime", "timestamp/rating must be finite numbers.*notatime"),
    *[(f"3,2,{rating},{timestamp}", "timestamp/rating must be finite numbers")
      for timestamp, rating in [("inf", "4.0"), ("1e30", "4.0"), ("-inf", "4.0"), ("300", "nan"), ("300", "inf")]],
    ("2,99,4.0,300", "item '99' has no title"),
])
def test_bad_ratings_line_is_named_and_skippable(tmp_path, line, message):
  d = ml_dir(tmp_path, ratings=RATINGS_CSV + line + "\n")
  with pytest.raises(DataError, match=rf"ratings\.csv, line 6: {message}"):
    sources.read_movielens(d)
  assert sources.read_movielens(d, skip_bad_lines=True).num_interactions == 4


def test_bad_encoding(tmp_path):
  d = ml_dir(tmp_path, movies=MOVIES_CSV.encode() + b"4,Bad \xff title,Drama\n")
  with pytest.raises(DataError, match=r"movies\.csv, line 5: not valid utf-8"):
    sources.read_movielens(d)
  assert sources.read_movielens(d, skip_bad_lines=True).num_items == 3


def test_amazon_malformed_json_and_fields(tmp_path):
  write(tmp_path / "meta_X.json", json.dumps({"asin": "A1", "title": "T"}) + "\n")
  good = json.dumps({"reviewerID": "u", "asin": "A1", "unixReviewTime": 1, "overall": 5.0})
  write(tmp_path / "X.json", good + "\n" + json.dumps({"reviewerID": "v", "asin": "A1", "unixReviewTime": 2,
                                                       "overall": None}) + "\n")
  with pytest.raises(DataError, match=r"X\.json, line 2: timestamp/rating must be finite numbers.*None"):
    sources.read_amazon(tmp_path)
  write(tmp_path / "X.json", good + "\n{not json\n")
  with pytest.raises(DataError, match=r"X\.json, line 2: malformed JSON"):
    sources.read_amazon(tmp_path)
  write(tmp_path / "X.json", good + "\n" + json.dumps({"reviewerID": "u", "asin": "A1"}) + "\n")
  with pytest.raises(DataError, match=r"X\.json, line 2: missing one of the fields"):
    sources.read_amazon(tmp_path)
  write(tmp_path / "X.json", json.dumps({"who": "u"}) + "\n")
  with pytest.raises(DataError, match=r"X\.json, line 1: wrong fields"):
    sources.read_amazon(tmp_path)
  (tmp_path / "meta_X.json").unlink()
  with pytest.raises(DataError, match="expected one reviews file and one meta_"):
    sources.read_amazon(tmp_path)


def test_bigrec_json_errors(tmp_path):
  with pytest.raises(DataError, match=r"missing file: .*train\.json"):
    sources.read_bigrec_json(tmp_path)
  write(tmp_path / "train.json", '[{"instruction": "i",\n "input": }]')
  with pytest.raises(DataError, match=r"train\.json, line 2: malformed JSON"):
    sources.read_bigrec_json(tmp_path)
  write(tmp_path / "train.json", json.dumps([bigrec_record("a", ["X"], "Y"), {"input": "x", "output": '"Y"'}]))
  with pytest.raises(DataError, match=r"train\.json, record 1: missing fields \['instruction', 'user'\]"):
    sources.read_bigrec_json(tmp_path)
  listed = dict(bigrec_record("a", ["X"], "Y"), output=['"Y"'])
  write(tmp_path / "train.json", json.dumps([bigrec_record("a", ["X"], "Y"), listed]))
  with pytest.raises(DataError, match=r"train\.json, record 1: fields \['output'\] must be strings, got \['list'\]"):
    sources.read_bigrec_json(tmp_path)


def test_mapping_file(tmp_path):
  keys = ("1", "2", "3")
  write(tmp_path / "map.csv", "user,client\n1,0\n2,1\n3,1\n99,0\n")
  np.testing.assert_array_equal(partition.mapping_partition(tmp_path / "map.csv", keys, 2), [0, 1, 1])
  write(tmp_path / "map.csv", "user,client\n1,0\n2,7\n")
  with pytest.raises(DataError, match=r"map\.csv, line 3: client 7 outside"):
    partition.mapping_partition(tmp_path / "map.csv", keys, 2)
  write(tmp_path / "map.csv", "user,client\n1,0\n2,1\n")
  with pytest.raises(DataError, match=r"1 users have no client, e\.g\. user '3'"):
    partition.mapping_partition(tmp_path / "map.csv", keys, 2)
  write(tmp_path / "map.csv", "id,cl\n1,0\n")
  with pytest.raises(DataError, match=r"map\.csv, line 1: wrong columns"):
    partition.mapping_partition(tmp_path / "map.csv", keys, 2)


def test_empty_client_is_an_error(tmp_path):
  with pytest.raises(DataError, match=r"client\(s\) \[2\] with no users"):
    partition.check_clients(np.array([0, 1, 1, 0, 3]), 4, "mapping")
  ds = sources.synthetic(num_users=40, seed=0)
  write(tmp_path / "map.csv", "user,client\n" + "".join(f"{k},{i % 2}\n" for i, k in enumerate(ds.user_keys)))
  with pytest.raises(DataError, match=r"partition 'mapping' left client\(s\) \[2\] with no users"):
    prepare_dataset("synthetic", num_clients=3, partition="mapping", mapping_file=tmp_path / "map.csv",
                    synthetic_kwargs={"num_users": 40})


def test_partitions_cover_all_users():
  prep, stats = prepare_dataset("synthetic", seed=0, num_clients=4, partition="dirichlet", dirichlet_alpha=5.0)
  assert len(stats["clients"]) == 4 and sum(c["users"] for c in stats["clients"]) == stats["users"]
  emb = np.concatenate([np.zeros((10, 2)), np.ones((10, 2)), np.full((10, 2), 5.0)])
  labels = partition.kmeans(emb + 0.01 * np.random.default_rng(0).normal(size=emb.shape), 3, seed=0)
  assert len(set(labels[:10])) == len(set(labels[10:20])) == len(set(labels[20:])) == 1
  assert len(set(labels)) == 3
