"""Problems for training prompts and evaluation: the embedded task, JSONL files, or hub datasets.

Every source yields ``Example(id, problem, answer, solution)``. JSONL files are the default for the real
benchmarks (../shared/data in this project); a hub dataset id through ``datasets`` serves where files are absent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tip.testbed.arith import sample_problems

BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


class DataError(ValueError):
    """A data configuration that cannot be served."""


@dataclass(frozen=True)
class Example:
    id: str
    problem: str
    answer: str
    solution: str | None = None


def _from_jsonl(path: Path, fields: Mapping[str, str]) -> list[Example]:
    if not path.is_file():
        raise DataError(
            f"data file {str(path)!r} does not exist; set data_root=<folder> (or the file's own path option), "
            "or use a hub dataset id"
        )
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON ({err.msg} at column {err.colno}); each line "
                                "must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object with the fields "
                                f"{sorted(set(fields.values()) or {'problem', 'answer'})}")
            try:
                out.append(Example(
                    id=str(row.get(fields.get("id", "id"), lineno)),
                    problem=row[fields.get("problem", "problem")],
                    answer=str(row[fields.get("answer", "answer")]),
                    solution=row.get(fields.get("solution", "solution")),
                ))
            except KeyError as err:
                raise DataError(f"{path}:{lineno} has no field {err.args[0]!r} (fields: {sorted(row)})") from None
    return out


def _from_hub(hub_id: str, subset: str | None, split: str, fields: Mapping[str, str]) -> list[Example]:
    try:
        import datasets
    except ImportError as err:
        raise DataError("hub datasets need the `datasets` package: pip install -e .[datasets]") from err
    try:
        ds = datasets.load_dataset(hub_id, subset, split=split)
    except Exception as err:  # offline, unknown id, ...: one message naming the id
        raise DataError(f"could not load hub dataset {hub_id!r} (subset {subset!r}, split {split!r}): {err}") from err
    key = lambda name: fields.get(name, name)
    return [
        Example(id=str(r.get(key("id"), i)), problem=r[key("problem")], answer=str(r[key("answer")]),
                solution=r.get(key("solution")))
        for i, r in enumerate(ds)
    ]


def load_examples(source: Mapping[str, Any], split: str = "train") -> list[Example]:
    """Examples of one dataset config.

    ``source`` keys: ``kind`` (embedded | jsonl | hub); for embedded ``size`` and ``seed``; for jsonl ``path``;
    for hub ``hub_id``, ``subset``, ``split``, ``hub_fields`` (column renames of the hub copy) and
    ``answer_after`` (keep the text after this marker as the answer); optional ``fields`` renaming columns and
    ``limit`` keeping the first N.
    """
    kind = source.get("kind")
    fields = source.get("fields") or {}
    if kind == "embedded":
        probs = sample_problems(int(source["size"]), seed=int(source.get("seed", 0)), split=split)
        examples = [Example(p.id, p.problem, p.answer, p.solution) for p in probs]
    elif kind == "jsonl":
        examples = _from_jsonl(Path(str(source["path"])), fields)
        if not examples:
            raise DataError(f"data file {str(source['path'])!r} holds no examples (it is empty); expected one JSON "
                            "object per line")
    elif kind == "hub":
        examples = _from_hub(source["hub_id"], source.get("subset"), source.get("split", split),
                             source.get("hub_fields") or fields)
    else:
        raise DataError(f"unknown data kind {kind!r}; known: embedded, jsonl, hub")
    marker = source.get("answer_after")
    if marker and kind == "hub":  # e.g. GSM8K's hub column holds the worked solution, then '#### 72'
        examples = [Example(e.id, e.problem, e.answer.split(marker)[-1].strip().replace(",", ""), e.answer)
                    for e in examples]
    limit = source.get("limit")
    return examples[: int(limit)] if limit else examples


def uses_chat_template(tokenizer, chat_template: str | bool = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: when it has one ('auto'), or as forced."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat_template == "auto" else bool(chat_template)


def prompt_token_ids(tokenizer, problems: list[str], template: str, chat_template: str | bool = "auto",
                     chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each formatted prompt. A chat template already holds its special tokens, so none are added
    then; plain prompts get the tokenizer's own (e.g. BOS)."""
    add_special = not uses_chat_template(tokenizer, chat_template)
    return [tokenizer(format_prompt(tokenizer, p, template, chat_template, chat_template_kwargs),
                      add_special_tokens=add_special)["input_ids"]
            for p in problems]


def format_prompt(tokenizer, problem: str, template: str, chat_template: str | bool = "auto",
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for one problem: ``template`` with ``{problem}`` replaced, through the tokenizer's chat template
    when it has one (``chat_template='auto'``) or when forced (True). ``chat_template_kwargs`` are the template's
    own arguments (Qwen3: ``enable_thinking``)."""
    text = template.replace("{problem}", problem)  # not str.format: templates contain \boxed{}
    if uses_chat_template(tokenizer, chat_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
            **dict(chat_template_kwargs or {}),
        )
    return text
