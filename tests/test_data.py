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
    # A teacher that does not exist: had a model been loaded first, the error would name it instead.
    cfg = compose_config("data=gsm8k", "eval=gsm8k", f"data_root={tmp_path}", "logger=none",
                         f"{node}.path={bad}", "pair.teacher=/nonexistent/teacher")
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
