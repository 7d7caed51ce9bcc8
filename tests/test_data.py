"""tests/data: every excerpt row is the whole file's row at the number tests/data/README.md gives, and nothing
else is in the excerpt folder."""
import os

import pyarrow.parquet as pq
import pytest

from conftest import DATA_DIR

# 0-based row numbers of the whole files, as listed in tests/data/README.md
EXCERPT_ROWS = {
    "math500.jsonl": [0, 4, 31, 44, 78, 162, 242, 257, 307, 459, 488],
    "amc23.jsonl": [0, 1, 2],
    "aime24.jsonl": [0, 7, 23],
    "aime25.jsonl": [0, 1, 2],
    "minerva_math.jsonl": [0, 1, 72],
    "olympiadbench.jsonl": [0, 1, 13, 76, 289, 316],
    "gsm8k.jsonl": [0, 1, 2, 3, 4, 5, 6, 7, 146],
    "aimo_amc.jsonl": [0, 1, 2],
    "aimo_aime.jsonl": [0, 37, 52],
    "dsr_sub.parquet": [0, 1, 2, 3, 124, 265, 267, 473, 985, 1069, 1134],
}


def _lines(path):
    with open(path, "rb") as f:
        return f.read().splitlines()


# code and logic rows (tests/test_code.py): real rows of HumanEval, MBPP, KK, and rows of our own in the LeetCode and
# LiveCodeBench formats, written by make_code_rows.py (tests/data/README.md, "Code and logic")
CODE_FILES = ["humaneval.jsonl", "mbpp.json", "kk.jsonl", "leetcode.jsonl", "livecodebench.jsonl", "make_code_rows.py"]


def test_excerpt_folder_holds_the_listed_files():
    assert sorted(os.listdir(DATA_DIR)) == sorted([*EXCERPT_ROWS, *CODE_FILES, "README.md"])
    readme = open(os.path.join(DATA_DIR, "README.md")).read()
    for name, rows in EXCERPT_ROWS.items():
        count = (pq.read_metadata(os.path.join(DATA_DIR, name)).num_rows if name.endswith(".parquet")
                 else len(_lines(os.path.join(DATA_DIR, name))))
        assert count == len(rows), name
        assert f"| {name} | {len(rows)} (" in readme, name  # the README's table gives the same count
    assert sum(os.path.getsize(os.path.join(DATA_DIR, n)) for n in [*EXCERPT_ROWS, *CODE_FILES]) < 200_000


@pytest.mark.parametrize("name", sorted(EXCERPT_ROWS))
def test_excerpt_rows_are_verbatim_rows_of_the_whole_file(full_data_dir, name):
    rows = EXCERPT_ROWS[name]
    if name.endswith(".parquet"):
        whole, excerpt = pq.read_table(os.path.join(full_data_dir, name)), pq.read_table(os.path.join(DATA_DIR, name))
        assert excerpt.schema.remove_metadata() == whole.schema.remove_metadata()  # same columns and types
        assert excerpt.to_pylist() == whole.take(rows).to_pylist()
    else:
        whole = _lines(os.path.join(full_data_dir, name))
        assert _lines(os.path.join(DATA_DIR, name)) == [whole[i] for i in rows]  # byte for byte
