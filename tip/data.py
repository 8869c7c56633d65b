"""Problems for training prompts and evaluation: the embedded task, JSONL files, or hub datasets.

Every source yields ``Example(id, problem, answer, solution, tags)``. JSONL files are the default
for the real benchmarks (../shared/data in this project); a hub dataset id through ``datasets``
serves where files are absent.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tip.errors import UserError
from tip.tasks import agent_problems, sample_problems

BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
DATA_KINDS = ("embedded", "embedded_agent", "jsonl", "hub", "dapo")

# DAPO-Math-17k wraps every problem in its own answer-format instruction; the paper's release strips
# it (and appends the boxed instruction through the prompt template).
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
               "to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO_SPLITS = ("train", "validation")


class DataError(UserError):
    """A data configuration that cannot be served."""


@dataclass(frozen=True)
class Example:
    id: str
    problem: str
    answer: str
    solution: str | None = None
    # groups evaluation reports accuracy for (the embedded task: its error types)
    tags: tuple[str, ...] = ()


def _jsonl_rows(path: Path):
    """(line number, object) for every non-blank line; a line that is not a JSON object names file
    and line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno} is not UTF-8 text (byte "
                                f"{raw[err.start]:#04x} at column {err.start + 1}); data files "
                                "must be UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON ({err.msg} at column "
                                f"{err.colno}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object")
            yield lineno, row


def _from_jsonl(path: Path, fields: Mapping[str, str]) -> list[Example]:
    if not path.is_file():
        raise DataError(
            f"data file {str(path)!r} does not exist; set data_root=<folder> (or the file's own "
            "path option), or use a hub dataset id"
        )
    out = []
    for lineno, row in _jsonl_rows(path):
        try:
            out.append(Example(
                id=str(row.get(fields.get("id", "id"), lineno)),
                problem=row[fields.get("problem", "problem")],
                answer=str(row[fields.get("answer", "answer")]),
                solution=row.get(fields.get("solution", "solution")),
            ))
        except KeyError as err:
            raise DataError(f"{path}:{lineno} has no field {err.args[0]!r} (fields: "
                            f"{sorted(row)})") from None
    return out


def _from_hub(hub_id: str, subset: str | None, split: str,
              fields: Mapping[str, str]) -> list[Example]:
    try:
        import datasets
    except ImportError as err:
        raise DataError("hub datasets need the `datasets` package: pip install -e "
                        ".[datasets]") from err
    try:
        ds = datasets.load_dataset(hub_id, subset, split=split)
    except Exception as err:  # offline, unknown id, ...: one message naming the id
        raise DataError(f"could not load hub dataset {hub_id!r} (subset {subset!r}, split "
                        f"{split!r}): {err}") from err
    key = lambda name: fields.get(name, name)
    return [
        Example(id=str(r.get(key("id"), i)), problem=r[key("problem")],
                answer=str(r[key("answer")]), solution=r.get(key("solution")))
        for i, r in enumerate(ds)
    ]


def dapo_rows(source: Mapping[str, Any]) -> list[dict]:
    """DAPO-Math-17k rows (its hub schema: ``prompt`` = [{"role": "user", "content": ...}],
    ``reward_model`` = {"ground_truth": ...}) from ``source.path`` (JSONL or Parquet in that schema)
    when it exists, else the hub."""
    path = Path(str(source.get("path"))) if source.get("path") else None
    if path is not None and path.is_file():
        if path.suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        return [row for _, row in _jsonl_rows(path)]
    try:
        import datasets
    except ImportError as err:
        raise DataError("data=dapo_math reads the hub through `datasets`: pip install -e "
                        ".[datasets]") from err
    try:
        return list(datasets.load_dataset(source["hub_id"], split="train"))
    except Exception as err:
        where = f"{path} does not exist, and " if path is not None else ""
        raise DataError(f"could not load {source['hub_id']!r}: {where}the hub could not be read "
                        f"({err}). Download it where the hub is reachable and set data.source.path "
                        "to the file (JSONL or Parquet in the hub's schema)") from err


def prepare_dapo(rows: list[dict], split: str, seed: int = 42,
                 train_fraction: float = 0.8) -> list[Example]:
    """The paper's release preparation of DAPO-Math-17k: the instruction prefix and suffix stripped
    from each prompt, the ground truth from ``reward_model``, shuffled with ``seed`` and split
    ``train_fraction`` train / the rest validation (disjoint by construction)."""
    if split not in DAPO_SPLITS:
        raise DataError(f"DAPO-Math has the splits {', '.join(DAPO_SPLITS)}; got {split!r}")
    examples = []
    for i, row in enumerate(rows):
        try:
            text = row["prompt"][0]["content"]
            answer = str(row["reward_model"]["ground_truth"])
        except (KeyError, IndexError, TypeError):
            raise DataError(f"DAPO-Math row {i} is not in the hub's schema (prompt[0].content, "
                            f"reward_model.ground_truth): {str(row)[:200]}") from None
        problem = text.removeprefix(DAPO_PREFIX).removesuffix(DAPO_SUFFIX).strip()
        index = (row.get("extra_info") or {}).get("index", i)
        examples.append(Example(id=f"dapo-{index}", problem=problem, answer=answer))
    if not examples:
        raise DataError("DAPO-Math holds no rows")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * train_fraction)
    chosen = order[:cut] if split == "train" else order[cut:]
    return [examples[i] for i in chosen]


def load_examples(source: Mapping[str, Any], split: str = "train") -> list[Example]:
    """Examples of one dataset config.

    ``source`` keys: ``kind`` (``DATA_KINDS``); for dapo ``path`` (a local copy, else the hub),
    ``hub_id``, ``split`` (train | validation), ``seed``, ``train_fraction``; for embedded and
    embedded_agent ``size`` and ``seed``;
    for jsonl ``path``;
    for hub ``hub_id``, ``subset``, ``split``, ``hub_fields`` (column renames of the hub copy) and
    ``answer_after`` (keep the text after this marker as the answer); optional ``fields`` renaming
    columns and ``limit`` keeping the first N.
    """
    kind = source.get("kind")
    fields = source.get("fields") or {}
    # the latter: the same problems, solved with a calculator tool
    if kind in ("embedded", "embedded_agent"):
        sample = sample_problems if kind == "embedded" else agent_problems
        probs = sample(int(source["size"]), seed=int(source.get("seed", 0)), split=split)
        examples = [Example(p.id, p.problem, p.answer, p.solution, p.tags) for p in probs]
    elif kind == "jsonl":
        examples = _from_jsonl(Path(str(source["path"])), fields)
        if not examples:
            raise DataError(f"data file {str(source['path'])!r} holds no examples (it is empty); "
                            "expected one JSON object per line")
    elif kind == "dapo":
        examples = prepare_dapo(dapo_rows(source), source.get("split", split),
                                int(source.get("seed", 42)),
                                float(source.get("train_fraction", 0.8)))
    elif kind == "hub":
        examples = _from_hub(source["hub_id"], source.get("subset"), source.get("split", split),
                             source.get("hub_fields") or fields)
    else:
        raise DataError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")
    marker = source.get("answer_after")
    # e.g. GSM8K's hub column holds the worked solution, then '#### 72'
    if marker and kind == "hub":
        examples = [Example(e.id, e.problem, e.answer.split(marker)[-1].strip().replace(",", ""),
                            e.answer)
                    for e in examples]
    limit = source.get("limit")
    return examples[: int(limit)] if limit else examples


def uses_chat_template(tokenizer, chat_template: str | bool = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: when it has one ('auto'), or as
    forced."""
    return (bool(getattr(tokenizer, "chat_template", None)) if chat_template == "auto"
            else bool(chat_template))


def prompt_token_ids(tokenizer, problems: list[str], template: str,
                     chat_template: str | bool = "auto",
                     chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each formatted prompt. A chat template already holds its special tokens, so none
    are added then; plain prompts get the tokenizer's own (e.g. BOS)."""
    add_special = not uses_chat_template(tokenizer, chat_template)
    return [tokenizer(format_prompt(tokenizer, p, template, chat_template, chat_template_kwargs),
                      add_special_tokens=add_special)["input_ids"]
            for p in problems]


def format_prompt(tokenizer, problem: str, template: str, chat_template: str | bool = "auto",
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for one problem: ``template`` with ``{problem}`` replaced, through the
    tokenizer's chat template when it has one (``chat_template='auto'``) or when forced (True).
    ``chat_template_kwargs`` are the template's own arguments (Qwen3: ``enable_thinking``)."""
    text = template.replace("{problem}", problem)  # not str.format: templates contain \boxed{}
    if uses_chat_template(tokenizer, chat_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
            **dict(chat_template_kwargs or {}),
        )
    return text
