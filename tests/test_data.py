"""Bad data files give one error naming the file and line, before any model loads; the run is marked failed."""

import json

import pytest

from tip.data import DataError, load_examples
from tip.train import train

from support import compose_config

GOOD = '{"problem": "1+1?", "answer": "2"}\n'


def jsonl(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return {"kind": "jsonl", "path": str(path)}


@pytest.mark.parametrize("text,message", [
    (GOOD + '{"problem": "2+2?", "answer": 4\n', r"data.jsonl:2 is not valid JSON \(Expecting ',' delimiter"),
    (GOOD + GOOD + '["a", "b"]\n', r"data.jsonl:3 is a JSON list, not an object"),
    (GOOD + '{"problem": "x"}\n', r"data.jsonl:2 has no field 'answer'"),
    ("", r"data.jsonl' holds no examples \(it is empty\)"),
    ("\n\n", r"holds no examples"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_examples(jsonl(tmp_path, text), "train")


@pytest.mark.parametrize("where", ["data", "eval"])
def test_bad_data_stops_a_run_before_any_model_loads(tmp_path, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "{not json\n")
    node = "data.source" if where == "data" else "eval.benchmarks.gsm8k.source"
    # A teacher that cannot load (a folder whose config names no model): had a model been loaded first, the
    # error would name it instead.
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    cfg = compose_config("data=gsm8k", "eval=gsm8k", f"data_root={tmp_path}", "logger=none",
                         f"{node}.path={bad}", f"pair.teacher={tmp_path / 'teacher'}")
    other = "eval.benchmarks.gsm8k.source" if where == "data" else "data.source"
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD)
    cfg_node = cfg
    for key in other.split("."):
        cfg_node = cfg_node[key]
    cfg_node.path = str(good)
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        train(cfg, tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "bad.jsonl:2" in status["error"]
    assert not (tmp_path / "run" / "eval.json").exists()


def dapo_row(i: int) -> dict:
    """A row in DAPO-Math-17k's hub schema."""
    from tip.data import DAPO_PREFIX, DAPO_SUFFIX

    return {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": f"id-{i}"},
            "prompt": [{"role": "user", "content": f"{DAPO_PREFIX}What is {i} + {i}?{DAPO_SUFFIX}"}],
            "reward_model": {"ground_truth": str(2 * i), "style": "rule-lean"}}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_dapo_math_is_prepared_as_the_papers_release_does(tmp_path, suffix):
    import pandas as pd

    rows = [dapo_row(i) for i in range(20)]
    path = tmp_path / f"dapo{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    cfg = compose_config("data=dapo_math", f"data.source.path={path}")
    train_set = load_examples(cfg.data.source, "train")
    cfg.data.source.split = "validation"
    val_set = load_examples(cfg.data.source, "train")  # the source's own split wins
    assert (len(train_set), len(val_set)) == (16, 4)  # 80 / 20
    assert {e.id for e in train_set}.isdisjoint(e.id for e in val_set)
    assert sorted(e.id for e in train_set + val_set) == sorted(f"dapo-id-{i}" for i in range(20))
    for e in train_set + val_set:
        i = int(e.id.split("-")[-1])
        assert e.problem == f"What is {i} + {i}?" and e.answer == str(2 * i)  # instruction stripped
    # Shuffled with seed 42: the order is the release's, not the file's.
    import random

    order = list(range(20))
    random.Random(42).shuffle(order)
    assert [e.id for e in train_set] == [f"dapo-id-{i}" for i in order[:16]]
    prompt = cfg.data.prompt_template.replace("{problem}", train_set[0].problem)
    assert prompt.endswith("Let's think step by step and output the final answer within \\boxed{}.")


def test_dapo_math_without_a_local_copy_and_without_the_hub_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    cfg = compose_config("data=dapo_math", f"data_root={tmp_path}")
    with pytest.raises(DataError, match=r"could not load 'BytedTsinghua-SIA/DAPO-Math-17k': .*dapo_math_17k.parquet "
                                        r"does not exist.*set data.source.path"):
        load_examples(cfg.data.source, "train")


def test_a_dapo_row_in_another_schema_is_named(tmp_path):
    path = tmp_path / "dapo.jsonl"
    path.write_text(json.dumps(dapo_row(0)) + "\n" + json.dumps({"problem": "x", "answer": "1"}) + "\n")
    cfg = compose_config("data=dapo_math", f"data.source.path={path}")
    with pytest.raises(DataError, match=r"DAPO-Math row 1 is not in the hub's schema"):
        load_examples(cfg.data.source, "train")
