"""Task data: shipped prompts, user JSONL, and the paper's data sets on small local files."""

import json

import pytest

from meal.tasks import DataError, hh_prompt, load_embedded, load_hh_rlhf, load_jsonl, load_summarize_from_feedback


def test_embedded_tasks_ship_enough_varied_prompts():
    a, s = load_embedded("assistant"), load_embedded("summary")
    assert len(a.train) + len(a.test) >= 200 and len(s.train) + len(s.test) >= 60
    for data in (a, s):
        assert data.test and not {e.id for e in data.train} & {e.id for e in data.test}
        assert len({e.text for e in data.train + data.test}) == len(data.train) + len(data.test)
    with pytest.raises(DataError, match="unknown embedded task"):
        load_embedded("poetry")


def test_user_jsonl_split_and_malformed_rows_report_their_line(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text("".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(10)))
    data = load_jsonl(str(good), test_fraction=0.2)
    assert len(data.train) == 8 and len(data.test) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: 1 faulty row\(s\): line 4: field 'text' must be a non-empty"):
        load_jsonl(str(bad))
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_jsonl(str(bad))
    bad.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        load_jsonl(str(bad))


def _hh_row(q, a_good, a_bad):
    ctx = f"\n\nHuman: {q}\n\nAssistant: Let me think.\n\nHuman: and more?"
    return {"chosen": f"{ctx}\n\nAssistant: {a_good}", "rejected": f"{ctx}\n\nAssistant: {a_bad}"}


def test_hh_rlhf_loader_on_local_files(tmp_path):
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(_hh_row(f"q{i}", "good", "bad")) + "\n" for i in range(3)))
    test.write_text("".join(json.dumps(_hh_row(f"t{i}", "good", "bad")) + "\n" for i in range(9)))
    data = load_hh_rlhf(data_files={"train": str(train), "test": str(test)})
    # chosen and rejected share the prompt: deduplicated to one per example
    assert len(data.train) == 3
    assert data.train[0].text.endswith("Human: and more?\n\nAssistant:")
    assert "good" not in data.train[0].text
    # every 4th test example: rows 0, 4, 8
    assert [e.text.split("Human: ")[1].split("\n")[0] for e in data.test] == ["t0", "t4", "t8"]
    assert hh_prompt("\n\nHuman: hi\n\nAssistant: yo") == "Human: hi\n\nAssistant:"


def test_summarize_from_feedback_loader_filters_and_dedupes(tmp_path):
    def row(pid, post):
        return {"info": {"id": pid, "post": post, "title": "t", "subreddit": "r"},
                "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}

    rows = [row("p1", "x" * 150), row("p1", "x" * 150), row("p2", "y" * 50), row("p3", "z" * 1300),
            row("p4", "w" * 1000)]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation")}
    data = load_summarize_from_feedback(data_files=files)
    assert [e.id for e in data.train] == ["p1", "p4"]  # 100-1200 characters, deduplicated by post id
    assert [e.id for e in load_summarize_from_feedback(data_files=files, max_test=1).test] == ["p1"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"info": {"post": "no id"}}) + "\n")
    with pytest.raises(DataError, match="row 0: expected info.id and info.post"):
        load_summarize_from_feedback(data_files=files)


def test_validation_prompts_are_held_out_of_training_the_same_way_every_time():
    """hold_out moves n training prompts (at most a quarter) to ``validation``: a fixed seeded choice, disjoint
    from what stays in training, the test split untouched, their own responses gone from the corpus."""
    from meal.tasks import Example, Response, TaskData

    train = [Example(str(i), f"prompt {i}") for i in range(40)]
    test = [Example(f"t{i}", f"test {i}") for i in range(5)]
    responses = [Response(str(i), f"prompt {i}", f"answer {i}") for i in range(40)]
    a = TaskData(train, test, responses).hold_out(8)
    b = TaskData(train, test, responses).hold_out(8)
    assert [e.id for e in a.validation] == [e.id for e in b.validation] and len(a.validation) == 8
    assert len(a.train) == 32 and not {e.id for e in a.train} & {e.id for e in a.validation}
    assert a.test == test and a.split("validation") == a.validation
    assert {r.group for r in a.responses} == {e.id for e in a.train}
    assert len(TaskData(train, test).hold_out(24).validation) == 10  # at most a quarter of 40
    assert [e.id for e in a.train] == sorted((e.id for e in a.train), key=int)  # training order kept
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        a.split("dev")
