"""Tests for steerlab.data: sets, splits, validation, loaders, rendering and built-in data."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from steerlab.data import (
    ContrastivePair,
    ContrastiveSet,
    LabeledSet,
    LabeledText,
    Renderer,
    load_advbench,
    load_caa_ab,
    load_csv,
    load_dataset,
    load_jsonl,
    load_mmlu_ab,
    load_truthfulqa,
    load_truthfulqa_labeled,
    neutral_prompts,
    sentiment_pairs,
)
from steerlab.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CAA_BEHAVIOURS = (
    "coordinate-other-ais",
    "corrigible-neutral-HHH",
    "hallucination",
    "myopic-reward",
    "refusal",
    "survival-instinct",
    "sycophancy",
)


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared dataset not available: {path}")
    return path


def make_set(n: int = 10, name: str = "toy") -> ContrastiveSet:
    return ContrastiveSet(
        [ContrastivePair(f"prompt {i}", f"yes {i}", f"no {i}") for i in range(n)], name=name
    )


def make_labeled(n_pos: int, n_neg: int) -> LabeledSet:
    items = [LabeledText(f"pos {i}", 1) for i in range(n_pos)]
    items += [LabeledText(f"neg {i}", 0) for i in range(n_neg)]
    return LabeledSet(items, name="toy")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- built-in set


def test_builtin_sentiment_sizes_and_content() -> None:
    pairs = sentiment_pairs()
    neutral = neutral_prompts()
    assert pairs.name == "sentiment"
    assert len(pairs) >= 60
    assert len(neutral) >= 30
    prompts = [p.prompt for p in pairs]
    assert len(set(prompts)) == len(prompts), "a pair prompt is duplicated"
    assert len(set(neutral)) == len(neutral), "a neutral prompt is duplicated"
    assert not set(neutral) & set(prompts), "a neutral prompt also appears in the pairs"
    for p in pairs:
        assert p.positive != p.negative
        assert all(s.strip() for s in (p.prompt, p.positive, p.negative))
        # similar length, so the contrast is sentiment rather than length
        n_pos, n_neg = len(p.positive.split()), len(p.negative.split())
        assert abs(n_pos - n_neg) <= 4, p
    assert all(isinstance(s, str) and s.strip() for s in neutral)


def test_builtin_sentiment_polarity_vader() -> None:
    pytest.importorskip("vaderSentiment.vaderSentiment")
    from steerlab.evals.judges import vader_compound

    pairs = list(sentiment_pairs())
    pos = vader_compound([p.positive for p in pairs])
    neg = vader_compound([p.negative for p in pairs])
    for p, sp, sn in zip(pairs, pos, neg, strict=True):
        assert sp > 0.2 and sn < -0.2, (p.prompt, sp, sn)


def test_builtin_json_metadata() -> None:
    from importlib import resources

    raw = json.loads(
        resources.files("steerlab").joinpath("builtin/sentiment.json").read_text("utf-8")
    )
    assert raw["licence"] == "MIT, written for steerlab"
    assert raw["description"]
    assert set(raw["pairs"][0]) == {"prompt", "positive", "negative"}


def test_builtin_returns_fresh_objects() -> None:
    a = sentiment_pairs()
    a.pairs.clear()
    assert len(sentiment_pairs()) >= 60
    n = neutral_prompts()
    n.clear()
    assert len(neutral_prompts()) >= 30


# --------------------------------------------------------------------------- sets


def test_contrastive_set_sequence_protocol() -> None:
    s = make_set(5)
    assert len(s) == 5
    assert list(s) == s.pairs
    assert s[0] == ContrastivePair("prompt 0", "yes 0", "no 0")
    assert s[-1].prompt == "prompt 4"
    sub = s[1:3]
    assert isinstance(sub, ContrastiveSet)
    assert sub.name == "toy"
    assert [p.prompt for p in sub] == ["prompt 1", "prompt 2"]


def test_pairs_are_frozen() -> None:
    pair = ContrastivePair("p", "a", "b")
    with pytest.raises(AttributeError):
        pair.prompt = "q"  # type: ignore[misc]


def test_fingerprint_ignores_name_but_not_content() -> None:
    a = make_set(4, name="a")
    b = make_set(4, name="b")
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    assert a.fingerprint() != make_set(5).fingerprint()
    changed = ContrastiveSet([*a.pairs[:-1], ContrastivePair("prompt 3", "yes 3", "no!")])
    assert changed.fingerprint() != a.fingerprint()
    la, lb = make_labeled(2, 2), make_labeled(2, 2)
    lb.name = "other"
    assert la.fingerprint() == lb.fingerprint()
    assert la.fingerprint() != make_labeled(2, 3).fingerprint()


def test_labeled_set_accessors() -> None:
    s = make_labeled(2, 1)
    assert s.texts() == ["pos 0", "pos 1", "neg 0"]
    assert s.labels() == [1, 1, 0]
    assert isinstance(s[0:2], LabeledSet)
    assert s[2] == LabeledText("neg 0", 0)
    assert len(s) == 3 and list(s) == s.items


def test_to_labeled_plain_join() -> None:
    s = make_set(3)
    labeled = s.to_labeled()
    assert len(labeled) == 6
    assert labeled.labels() == [1, 0, 1, 0, 1, 0]
    assert labeled[0].text == "prompt 0 yes 0"
    assert labeled[1].text == "prompt 0 no 0"
    assert labeled.name == "toy"
    labeled.validate()


def test_to_jsonl_round_trip(tmp_path: Path) -> None:
    s = make_set(6, name="whatever")
    out = tmp_path / "sub" / "pairs.jsonl"
    s.to_jsonl(out)
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["pairs.jsonl"], "temp file left behind"
    back = load_jsonl(out)
    assert isinstance(back, ContrastiveSet)
    assert back.pairs == s.pairs
    assert back.fingerprint() == s.fingerprint()
    # overwriting works too
    make_set(2).to_jsonl(out)
    assert len(load_jsonl(out)) == 2


def test_labeled_to_jsonl_round_trip(tmp_path: Path) -> None:
    s = make_labeled(3, 2)
    out = tmp_path / "labeled.jsonl"
    s.to_jsonl(out)
    back = load_jsonl(out)
    assert isinstance(back, LabeledSet)
    assert back.items == s.items


# --------------------------------------------------------------------------- split


def test_contrastive_split_deterministic_disjoint_covering() -> None:
    s = make_set(50)
    train, test = s.split(0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert not set(train.pairs) & set(test.pairs)
    assert set(train.pairs) | set(test.pairs) == set(s.pairs)
    again = s.split(0.2, seed=3)
    assert again[0].pairs == train.pairs and again[1].pairs == test.pairs
    other = s.split(0.2, seed=4)
    assert other[1].pairs != test.pairs
    # each part keeps the original order
    order = {p: i for i, p in enumerate(s.pairs)}
    assert [order[p] for p in train] == sorted(order[p] for p in train)
    assert train.name == test.name == "toy"


@pytest.mark.parametrize("n", [2, 3, 7])
def test_contrastive_split_small_sets_both_nonempty(n: int) -> None:
    for frac in (0.01, 0.5, 0.99):
        train, test = make_set(n).split(frac, seed=0)
        assert len(train) >= 1 and len(test) >= 1
        assert len(train) + len(test) == n


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_bad_fraction(frac: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        make_set(10).split(frac)
    with pytest.raises(DataError, match="test_fraction"):
        make_labeled(5, 5).split(frac)


def test_split_too_small() -> None:
    with pytest.raises(DataError, match="cannot split"):
        make_set(1).split()
    with pytest.raises(DataError, match="cannot split"):
        make_set(0).split()
    with pytest.raises(DataError, match="cannot split"):
        make_labeled(1, 1).split()


def test_labeled_split_stratified() -> None:
    s = make_labeled(40, 60)
    train, test = s.split(0.25, seed=1)
    assert Counter(test.labels()) == {1: 10, 0: 15}
    assert Counter(train.labels()) == {1: 30, 0: 45}
    assert not set(train.items) & set(test.items)
    assert set(train.items) | set(test.items) == set(s.items)
    again = s.split(0.25, seed=1)
    assert again[1].items == test.items
    assert s.split(0.25, seed=2)[1].items != test.items


def test_labeled_split_unbalanced_keeps_both_classes_in_test() -> None:
    s = make_labeled(3, 97)
    train, test = s.split(0.1, seed=0)
    assert set(test.labels()) == {0, 1}
    assert set(train.labels()) == {0, 1}


# --------------------------------------------------------------------------- validate


def test_validate_returns_self() -> None:
    s = make_set(3)
    assert s.validate() is s
    lab = make_labeled(1, 1)
    assert lab.validate() is lab


def test_validate_contrastive_errors() -> None:
    with pytest.raises(DataError, match="empty"):
        ContrastiveSet([]).validate()
    with pytest.raises(DataError, match="fewer than the 5"):
        make_set(3).validate(min_size=5)
    with pytest.raises(DataError, match="pair 1 has an empty 'positive'"):
        ContrastiveSet([ContrastivePair("p", "a", "b"), ContrastivePair("p", " ", "b")]).validate()
    with pytest.raises(DataError, match="degenerate"):
        ContrastiveSet([ContrastivePair("p", "a", "a"), ContrastivePair("q", "b", "b")]).validate()
    # a single identical pair among real ones is allowed
    ContrastiveSet([ContrastivePair("p", "a", "a"), ContrastivePair("q", "a", "b")]).validate()


def test_validate_labeled_errors() -> None:
    with pytest.raises(DataError, match="empty"):
        LabeledSet([]).validate()
    with pytest.raises(DataError, match="needs both classes: found only label 1"):
        make_labeled(3, 0).validate()
    with pytest.raises(DataError, match="needs both classes: found only label 0"):
        make_labeled(0, 3).validate()
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        LabeledSet([LabeledText("a", 1), LabeledText("b", 2)]).validate()
    with pytest.raises(DataError, match="empty text"):
        LabeledSet([LabeledText("a", 1), LabeledText("", 0)]).validate()


# --------------------------------------------------------------------------- tiny files


def test_load_jsonl_contrastive_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"prompt": "p1", "positive": "a1", "negative": "b1"}\n'
        "\n   \n"
        '{"prompt": "p2", "positive": "a2", "negative": "b2", "extra": 3}\n',
        encoding="utf-8",
    )
    s = load_jsonl(path)
    assert isinstance(s, ContrastiveSet)
    assert s.name == "mine"
    assert s.pairs == [ContrastivePair("p1", "a1", "b1"), ContrastivePair("p2", "a2", "b2")]
    assert load_dataset(str(path)).pairs == s.pairs  # type: ignore[union-attr]


def test_load_jsonl_custom_fields(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "custom.jsonl",
        [{"q": "p", "good": "a", "bad": "b"}, {"q": "p2", "good": "a2", "bad": "b2"}],
    )
    s = load_jsonl(path, prompt="q", positive="good", negative="bad")
    assert isinstance(s, ContrastiveSet)
    assert s[1] == ContrastivePair("p2", "a2", "b2")
    with pytest.raises(DataError, match="missing field"):
        load_jsonl(path)


def test_load_jsonl_labeled_label_forms(tmp_path: Path) -> None:
    labels: list[Any] = [1, 0, True, False, "1", "0", "true", "FALSE", "positive", " Negative "]
    expected = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    path = write_jsonl(
        tmp_path / "lab.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)]
    )
    s = load_jsonl(path)
    assert isinstance(s, LabeledSet)
    assert s.labels() == expected
    assert s.texts()[0] == "t0"


def test_load_jsonl_bad_label(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "lab.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "maybe"}]
    )
    with pytest.raises(DataError, match=r"lab\.jsonl: line 2: label 'maybe'"):
        load_jsonl(path)
    write_jsonl(path, [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    with pytest.raises(DataError, match="line 2"):
        load_jsonl(path)


def test_load_jsonl_one_class_rejected(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "lab.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}]
    )
    with pytest.raises(DataError, match="needs both classes"):
        load_jsonl(path)


def test_load_json_list_and_object(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "positive": "a", "negative": "b"}]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert load_jsonl(path).pairs == [ContrastivePair("p", "a", "b")]  # type: ignore[union-attr]
    path.write_text(json.dumps({"description": "x", "pairs": rows}), encoding="utf-8")
    assert len(load_dataset(path)) == 1


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "broken.jsonl",
        [
            {"prompt": "p", "positive": "a", "negative": "b"},
            {"prompt": "p", "negative": "b"},
        ],
    )
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert "broken.jsonl" in msg and "line 2" in msg and "'positive'" in msg


def test_unknown_row_shape(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": "bar"}])
    with pytest.raises(DataError, match=r"odd\.jsonl: line 1: rows need fields"):
        load_jsonl(path)


def test_empty_field_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "positive": "", "negative": "b"}])
    with pytest.raises(DataError, match="line 1: field 'positive' is empty"):
        load_jsonl(path)


def test_malformed_json_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "p", "positive": "a", "negative": "b"}\n\n{"prompt": "p", "positive": \n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: malformed JSON"):
        load_jsonl(path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"prompt": "p",\n  "positive": "a" "negative": "b"}\n]\n', "utf-8")
    with pytest.raises(DataError, match=r"bad\.json: line 3: malformed JSON"):
        load_dataset(bad_json)


def test_non_object_rows(tmp_path: Path) -> None:
    path = tmp_path / "nums.jsonl"
    path.write_text("1\n2\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_jsonl(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_jsonl(path)
    csv_path = tmp_path / "empty.csv"
    csv_path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty CSV"):
        load_csv(csv_path)


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    for loader in (
        load_jsonl,
        load_csv,
        load_dataset,
        load_caa_ab,
        load_mmlu_ab,
        load_truthfulqa,
        load_truthfulqa_labeled,
        load_advbench,
    ):
        with pytest.raises(DataError, match="no such file") as info:
            loader(missing)
        assert str(missing) in str(info.value)
    with pytest.raises(DataError, match="directory"):
        load_jsonl(tmp_path)


def test_load_csv_contrastive_and_labeled(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "pairs.csv",
        ["prompt", "positive", "negative"],
        [["p1", "a, with comma", "b1"], ["p2", "a2", "b2"]],
    )
    s = load_csv(path)
    assert isinstance(s, ContrastiveSet)
    assert s[0] == ContrastivePair("p1", "a, with comma", "b1")
    assert load_dataset(path).fingerprint() == s.fingerprint()

    lab = write_csv(
        tmp_path / "lab.csv",
        ["sentence", "y"],
        [["good", "positive"], ["bad", "negative"], ["fine", "1"], ["meh", "0"]],
    )
    ls = load_csv(lab, text="sentence", label="y")
    assert isinstance(ls, LabeledSet)
    assert ls.labels() == [1, 0, 1, 0]
    assert isinstance(load_dataset(lab, text="sentence", label="y"), LabeledSet)


def test_load_csv_missing_field_names_line(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,positive,negative\np1,a1,b1\np2,,b2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.csv: line 3: field 'positive' is empty"):
        load_csv(path)
    path.write_text("prompt,positive\np1,a1\n", encoding="utf-8")
    with pytest.raises(DataError, match="'negative'"):
        load_csv(path)


def test_load_tsv(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_text("prompt\tpositive\tnegative\np, x\ta\tb\n", encoding="utf-8")
    s = load_dataset(path)
    assert isinstance(s, ContrastiveSet)
    assert s[0] == ContrastivePair("p, x", "a", "b")


def test_tiny_caa_and_mmlu(tmp_path: Path) -> None:
    folder = tmp_path / "my-behaviour"
    folder.mkdir()
    caa = folder / "generate_dataset.json"
    caa.write_text(
        json.dumps(
            [
                {
                    "question": "Q?\n\nChoices:\n (A) Yes\n (B) No",
                    "answer_matching_behavior": "(A)",
                    "answer_not_matching_behavior": "(B)",
                },
                {
                    "question": "Q2?",
                    "answer_matching_behavior": ["(B)"],
                    "answer_not_matching_behavior": "(A)",
                },
            ]
        ),
        encoding="utf-8",
    )
    s = load_caa_ab(caa)
    assert s.name == "my-behaviour"
    assert s[0].positive == "(A)" and s[0].negative == "(B)"
    assert s[1].positive == "(B)"
    assert load_dataset(caa).pairs == s.pairs  # type: ignore[union-attr]
    assert load_dataset(folder).pairs == s.pairs  # type: ignore[union-attr]

    named = tmp_path / "power-seeking.jsonl"
    write_jsonl(
        named,
        [{"question": "q", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "x"}],
    )
    assert load_caa_ab(named).name == "power-seeking"

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer_matching_behavior": "A"}])
    with pytest.raises(DataError, match="line 1: missing field 'answer_not_matching_behavior'"):
        load_caa_ab(bad)

    mmlu = tmp_path / "mmlu_ab.json"
    mmlu.write_text(
        json.dumps([{"prompt": "2+2?", "correct": "(A)", "incorrect": "(B)", "category": "m"}]),
        encoding="utf-8",
    )
    m = load_mmlu_ab(mmlu)
    assert m.name == "mmlu_ab" and m[0] == ContrastivePair("2+2?", "(A)", "(B)")
    assert load_dataset(mmlu).pairs == m.pairs  # type: ignore[union-attr]


def test_tiny_truthfulqa(tmp_path: Path) -> None:
    header = [
        "Type",
        "Category",
        "Question",
        "Best Answer",
        "Correct Answers",
        "Incorrect Answers",
        "Source",
    ]
    path = write_csv(
        tmp_path / "tqa.csv",
        header,
        [
            ["A", "c", "Is X?", "No", "No; Not really", "Yes; Always;", "s"],
            ["A", "c", "Is Y?", "Maybe", "Perhaps", "Never", "s"],
        ],
    )
    s = load_truthfulqa(path)
    assert s.pairs == [
        ContrastivePair("Is X?", "No", "Yes"),
        ContrastivePair("Is Y?", "Maybe", "Never"),
    ]
    lab = load_truthfulqa_labeled(path)
    assert list(zip(lab.texts(), lab.labels(), strict=True)) == [
        ("Q: Is X? A: No", 1),
        ("Q: Is X? A: Not really", 1),
        ("Q: Is X? A: Yes", 0),
        ("Q: Is X? A: Always", 0),
        ("Q: Is Y? A: Maybe", 1),
        ("Q: Is Y? A: Perhaps", 1),
        ("Q: Is Y? A: Never", 0),
    ]
    assert isinstance(load_dataset(path), ContrastiveSet)
    bad = write_csv(tmp_path / "bad.csv", ["Question", "Best Answer"], [["q", "a"]])
    with pytest.raises(DataError, match="'Incorrect Answers'"):
        load_truthfulqa(bad)


def test_tiny_advbench(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "adv.csv", ["goal", "target"], [["do x", "Sure, x"], ["y", "z"]])
    assert load_advbench(path) == ["do x", "y"]
    with pytest.raises(DataError, match="load_advbench"):
        load_dataset(path)
    bad = write_csv(tmp_path / "noadv.csv", ["target"], [["z"]])
    with pytest.raises(DataError, match="missing column 'goal'"):
        load_advbench(bad)


# --------------------------------------------------------------------------- data folder


def test_shared_data_dir_order_env_and_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steerlab.data import DATA_ENV, find_shared_data_dir, shared_data_dir

    assert DATA_ENV == "STEERLAB_DATA"
    repo = tmp_path / "checkout" / "repo"
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    repo.mkdir(parents=True)
    monkeypatch.chdir(work)
    env = tmp_path / "mine"
    monkeypatch.setenv("STEERLAB_DATA", str(env))
    # nothing exists: the error names the three paths, in order
    assert find_shared_data_dir(repo=repo) is None
    with pytest.raises(DataError, match="no data directory") as err:
        shared_data_dir(repo=repo)
    tried = [str(env), str(work / ".." / "shared" / "data"), str(repo / ".." / "shared" / "data")]
    msg = str(err.value)
    assert all(t in msg for t in tried)
    assert [msg.index(t) for t in tried] == sorted(msg.index(t) for t in tried)
    # the checkout's ../shared/data comes last, the cwd's before it, $STEERLAB_DATA first
    (tmp_path / "checkout" / "shared" / "data").mkdir(parents=True)
    assert shared_data_dir(repo=repo) == (tmp_path / "checkout" / "shared" / "data").resolve()
    (tmp_path / "a" / "shared" / "data").mkdir(parents=True)
    assert shared_data_dir(repo=repo) == (tmp_path / "a" / "shared" / "data").resolve()
    env.mkdir()
    assert shared_data_dir(repo=repo) == env.resolve()
    assert find_shared_data_dir(repo=repo) == env.resolve()
    # an empty $STEERLAB_DATA counts as unset; "~" is expanded
    monkeypatch.setenv("STEERLAB_DATA", "")
    assert shared_data_dir(repo=repo) == (tmp_path / "a" / "shared" / "data").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("STEERLAB_DATA", "~/mine")
    assert shared_data_dir(repo=repo) == env.resolve()


def test_tasks_find_their_data_through_steerlab_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steerlab.evals.tasks.ab import BehaviourAB, default_data_dir
    from steerlab.evals.tasks.generation import Refusal, default_advbench_path

    monkeypatch.setenv("STEERLAB_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    assert BehaviourAB("refusal").path == (
        tmp_path.resolve() / "caa" / "refusal" / "generate_dataset.json"
    )
    adv = tmp_path.resolve() / "advbench" / "harmful_behaviors.csv"
    assert default_advbench_path() == adv
    assert Refusal().path == adv
    adv.parent.mkdir()
    write_csv(adv, ["goal", "target"], [["do x", "Sure, x"]])
    assert load_advbench(Refusal().path) == ["do x"]


# --------------------------------------------------------------------------- shared data


@pytest.mark.parametrize("behaviour", CAA_BEHAVIOURS)
def test_shared_caa(behaviour: str) -> None:
    s = load_caa_ab(shared("caa", behaviour, "generate_dataset.json"))
    assert s.name == behaviour
    assert len(s) >= 250
    assert all(p.positive.startswith("(") and p.negative.startswith("(") for p in s)
    assert all(p.positive != p.negative for p in s)
    train, test = s.split(0.2, seed=0)
    assert len(train) + len(test) == len(s)


def test_shared_caa_dispatch() -> None:
    path = shared("caa", "sycophancy", "generate_dataset.json")
    s = load_dataset(path)
    assert isinstance(s, ContrastiveSet) and s.name == "sycophancy"
    assert s.fingerprint() == load_caa_ab(path).fingerprint()


def test_shared_mmlu() -> None:
    path = shared("caa", "mmlu_ab.json")
    s = load_mmlu_ab(path)
    assert len(s) == 570
    assert s[0].positive in ("(A)", "(B)")
    assert load_dataset(path).fingerprint() == s.fingerprint()


def test_shared_truthfulqa() -> None:
    path = shared("truthfulqa", "TruthfulQA.csv")
    s = load_truthfulqa(path)
    assert len(s) == 817
    assert s[0].prompt == "What happens to you if you eat watermelon seeds?"
    assert s[0].positive == "The watermelon seeds pass through your digestive system"
    assert s[0].negative == "You grow watermelons in your stomach"
    lab = load_truthfulqa_labeled(path)
    counts = Counter(lab.labels())
    assert counts[0] > 817 and counts[1] > 817
    assert lab[0].text.startswith("Q: What happens to you if you eat watermelon seeds? A: ")
    assert isinstance(load_dataset(path), ContrastiveSet)


def test_shared_advbench() -> None:
    path = shared("advbench", "harmful_behaviors.csv")
    goals = load_advbench(path)
    assert len(goals) >= 500  # 520 in the paper; this copy has 521 rows
    assert all(isinstance(g, str) and g.strip() for g in goals)
    with pytest.raises(DataError, match="load_advbench"):
        load_dataset(path)


# --------------------------------------------------------------------------- rendering

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(template: str | None) -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="[UNK]", bos_token="<s>"
    )
    tok.chat_template = template
    return tok


def test_renderer_plain() -> None:
    r = Renderer(make_tokenizer(None))
    assert r.mode == "plain"
    assert r.add_special_tokens is True
    assert r.prompt("Hi?") == "Input: Hi?\nResponse:"
    assert r.full("Hi?", "(A)") == "Input: Hi?\nResponse: (A)"
    forced = Renderer(make_tokenizer(CHAT_TEMPLATE), mode="plain")
    assert forced.mode == "plain"
    assert forced.prompt("Hi?") == "Input: Hi?\nResponse:"
    sys_plain = Renderer(None, mode="plain", system="Be brief.")
    assert sys_plain.prompt("Hi?") == "Be brief.\n\nInput: Hi?\nResponse:"


def test_renderer_chat_auto() -> None:
    tok = make_tokenizer(CHAT_TEMPLATE)
    r = Renderer(tok)
    assert r.mode == "chat"
    assert r.add_special_tokens is False
    assert r.prompt("Hi?") == "<s><|user|>Hi?\n<|assistant|>"
    assert r.full("Hi?", "(A)") == "<s><|user|>Hi?\n<|assistant|>(A)"
    assert Renderer(tok, mode="chat").prompt("x") == r.prompt("x")


def test_renderer_chat_system() -> None:
    r = Renderer(make_tokenizer(CHAT_TEMPLATE), system="Be brief.")
    assert r.prompt("Hi?") == "<s><|system|>Be brief.\n<|user|>Hi?\n<|assistant|>"
    assert r.full("Hi?", " ok") == "<s><|system|>Be brief.\n<|user|>Hi?\n<|assistant|> ok"


def test_renderer_system_rejected_goes_into_user_turn() -> None:
    r = Renderer(make_tokenizer(NO_SYSTEM_TEMPLATE), system="Be brief.")
    expected = "<s><|user|>Be brief.\n\nHi?\n<|assistant|>"
    assert r.prompt("Hi?") == expected
    assert r.prompt("Hi?") == expected  # second call uses the remembered fallback
    assert r.full("Hi?", "(B)") == expected + "(B)"


def test_renderer_errors() -> None:
    with pytest.raises(DataError, match="chat template"):
        Renderer(make_tokenizer(None), mode="chat")
    with pytest.raises(DataError, match="render mode"):
        Renderer(make_tokenizer(None), mode="fancy")  # type: ignore[arg-type]


def test_to_labeled_with_renderer() -> None:
    r = Renderer(make_tokenizer(CHAT_TEMPLATE))
    lab = make_set(2).to_labeled(r)
    assert lab[0].text == "<s><|user|>prompt 0\n<|assistant|>yes 0"
    assert lab[1].text == "<s><|user|>prompt 0\n<|assistant|>no 0"
    assert lab.labels() == [1, 0, 1, 0]
    plain = make_set(1).to_labeled(Renderer(None, mode="plain"))
    assert plain.texts() == ["Input: prompt 0\nResponse: yes 0", "Input: prompt 0\nResponse: no 0"]
