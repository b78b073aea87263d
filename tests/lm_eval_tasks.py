"""Local lm-evaluation-harness tasks for the interop tests: a loglikelihood (multiple
choice) and a generate_until task over a local JSON file (lm-eval's stock tasks download
from a hub, which is not reachable here)."""

from __future__ import annotations

import json
from pathlib import Path

MC = """task: {prefix}_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: {prefix}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path, prefix: str) -> Path:
    """Write ``data.json`` and ``tasks/{mc,gen}.yaml`` (tasks ``{prefix}_mc`` and
    ``{prefix}_gen``) under ``folder``; returns the tasks folder (lm-eval's include path)."""
    rows = [{"question": f"Question {i}: how was the day?", "choices": ["great", "awful"],
             "label": 0, "answer": "great"} for i in range(8)]
    (folder / "data.json").write_text(json.dumps(rows))
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "mc.yaml").write_text(MC.format(prefix=prefix, data=folder / "data.json"))
    (tasks / "gen.yaml").write_text(GEN.format(prefix=prefix, data=folder / "data.json"))
    return tasks
