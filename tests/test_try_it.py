"""Try it: one prompt answered piece by piece as it is generated (`generation.stream`), and the widget that
streams the base's and the chosen runs' answers side by side, with the same text as `Run.generate`."""

from __future__ import annotations

import html
import threading
import time

import pytest

import nbtune
from nbtune import generation
from nbtune.embedded import load_rows
from nbtune.generation import side_by_side, stream
from nbtune.runner import open_run

PROMPTS = [row["prompt"] for row in load_rows("capitals", "eval")[:3]]  # countries the runs never saw
TINY = {"micro_batch_size": 16, "eval_every": None, "log_every": 5}
LONG_WAIT = 30.0  # a stream that hangs would wait this long: every test here ends far sooner


@pytest.fixture(scope="module")
def runs(store) -> dict[str, nbtune.Run]:
    trained = {}
    for method, steps in {"lora": 20, "ia3": 10}.items():
        config = nbtune.TuneConfig(method=method, training={"max_steps": steps, **TINY})
        trained[method] = nbtune.train(config, store=store, progress=False)
        assert trained[method].status == "finished", trained[method].error
    return trained


@pytest.fixture
def lora(runs) -> nbtune.Run:
    return runs["lora"]


def streams_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nbtune-stream" and t.is_alive()]


# ----- the engine: generation.stream ----------------------------------------------------------------------
def test_a_stream_yields_pieces_that_join_into_the_answer_generate_gives(lora):
    for prompt in PROMPTS:
        pieces = list(stream(lora, prompt, max_new_tokens=12))
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == lora.generate(prompt, max_new_tokens=12)[0]
    sampling = {"do_sample": True, "temperature": 1.5, "seed": 3, "max_new_tokens": 12}  # the same seed, the same text
    assert "".join(stream(lora, PROMPTS[0], **sampling)) == lora.generate(PROMPTS[0], **sampling)[0]
    assert not streams_alive()


def test_chat_mode_wraps_the_prompt_in_the_chat_template_as_generate_does(lora):
    chat = "".join(stream(lora, PROMPTS[0], max_new_tokens=12, chat_template=True))
    assert chat == lora.generate(PROMPTS[0], max_new_tokens=12, chat_template=True)[0]
    # trained on plain "Q: ...\nA:" prompts: without chat mode the prompt goes as it is, and is answered otherwise
    assert chat != "".join(stream(lora, PROMPTS[0], max_new_tokens=12))


def test_a_config_streams_the_answer_of_its_untuned_base(lora):
    table = side_by_side({"lora": lora}, PROMPTS, max_new_tokens=12)
    streamed = ["".join(stream(lora.config, prompt, max_new_tokens=12)) for prompt in PROMPTS]
    assert streamed == table.answers["base"]
    assert streamed != table.answers["lora"]


def test_an_error_in_generate_is_raised_from_the_stream_after_the_text_before_it(lora, monkeypatch):
    monkeypatch.setattr(generation, "PIECE_TIMEOUT_S", LONG_WAIT)  # a stream that missed the error would wait
    tokenizer = generation._tokenizer(lora)
    said = tokenizer(" Paris then", add_special_tokens=False)["input_ids"]

    def failing(**kwargs):  # says a few words, then fails
        import torch

        kwargs["streamer"].put(kwargs["input_ids"])  # the prompt, skipped
        kwargs["streamer"].put(torch.tensor(said))
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(lora.model, "generate", failing)
    received, start = [], time.monotonic()
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        for piece in stream(lora, PROMPTS[0]):
            received.append(piece)
    assert time.monotonic() - start < LONG_WAIT / 3
    assert "".join(received) == tokenizer.decode(said) and "Paris" in "".join(received)
    assert not streams_alive()


def _until_stopped(seen: threading.Event, said: list[int]):
    """A generate that says the tokens `said`, then waits for its stopping criteria to say stop."""
    def generate(**kwargs):
        import torch

        ids, streamer = kwargs["input_ids"], kwargs["streamer"]
        streamer.put(ids)
        if said:
            streamer.put(torch.tensor(said))
        deadline = time.monotonic() + LONG_WAIT
        while not kwargs["stopping_criteria"](ids, None).all() and time.monotonic() < deadline:
            time.sleep(0.01)
        if time.monotonic() < deadline:
            seen.set()
        streamer.end()
    return generate


def test_a_stream_that_gets_no_text_times_out_and_stops_the_generation(lora, monkeypatch):
    monkeypatch.setattr(generation, "PIECE_TIMEOUT_S", 0.5)
    stopped = threading.Event()
    monkeypatch.setattr(lora.model, "generate", _until_stopped(stopped, []))
    with pytest.raises(TimeoutError, match="the model gave no new text for 0.5 s"):
        list(stream(lora, PROMPTS[0]))
    assert stopped.is_set() and not streams_alive()


def test_closing_a_stream_early_stops_the_generation(lora, monkeypatch):
    monkeypatch.setattr(generation, "PIECE_TIMEOUT_S", LONG_WAIT)
    stopped = threading.Event()
    said = generation._tokenizer(lora)(" Paris", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(lora.model, "generate", _until_stopped(stopped, said))
    pieces, start = stream(lora, PROMPTS[0]), time.monotonic()
    assert "Paris" in next(pieces)
    pieces.close()
    assert stopped.is_set() and time.monotonic() - start < LONG_WAIT / 3 and not streams_alive()


@pytest.mark.parametrize(("prompt", "settings", "words"), [
    (PROMPTS[0], {"do_sample": True, "temperature": 0}, "temperature must be > 0 when sampling (got 0)"),
    (PROMPTS[0], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1 (got 0)"),
    (PROMPTS[0], {"num_beams": 2}, "num_beams must be 1 when streaming (got 2)"),
    (PROMPTS[0], {"temprature": 0.7}, "unknown generation setting 'temprature'"),
    ("  ", {}, "prompt must be a non-empty text"),
])
def test_a_bad_setting_fails_before_any_model_loads_naming_it(lora, no_loading, prompt, settings, words):
    for answerer in (open_run(lora.record), lora.config):
        with pytest.raises(ValueError) as err:
            stream(answerer, prompt, **settings)
        assert words in str(err.value)


# ----- the widget -----------------------------------------------------------------------------------------
@pytest.fixture
def try_it_module():
    pytest.importorskip("ipywidgets")
    from nbtune.widgets import try_it

    return try_it


def column_titles(widget) -> list[str]:
    return [column.children[0].value for column in widget.columns.children]


def test_try_it_streams_one_column_per_answerer_with_the_text_generate_gives(runs, try_it_module, monkeypatch):
    release = threading.Event()
    real_stream = try_it_module.stream

    def held(*args, **kwargs):  # the first piece waits until the test has looked at the widget mid-generation
        release.wait(LONG_WAIT)
        yield from real_stream(*args, **kwargs)

    monkeypatch.setattr(try_it_module, "stream", held)
    widget = try_it_module.TryIt(runs)
    widget.prompt.value, widget.max_new_tokens.value = PROMPTS[0], 10
    widget.button.click()
    assert widget.thread.is_alive() and widget.button.disabled  # the click returned: the kernel is free
    release.set()
    widget.thread.join(LONG_WAIT)
    assert not widget.thread.is_alive() and not widget.button.disabled
    assert column_titles(widget) == ["<b>base</b>", "<b>lora</b>", "<b>ia3</b>"]
    base = side_by_side(runs, PROMPTS[:1], max_new_tokens=10).answers["base"][0]
    assert widget.answers == {"base": base, **{n: r.generate(PROMPTS[0], max_new_tokens=10)[0] for n, r in runs.items()}}
    shown = widget.columns.children[1].children[1].value
    assert widget.answers["lora"].strip() and widget.answers["lora"].strip() in shown


def test_try_it_answers_only_the_chosen_runs_and_chat_mode_forces_the_template(runs, try_it_module):
    widget = nbtune.try_it(list(runs.values()))  # a list of runs is named by method
    assert widget.chosen.options == ("lora", "ia3") and widget.base == runs["lora"].config
    widget.prompt.value, widget.max_new_tokens.value = PROMPTS[1], 10
    widget.chosen.value, widget.chat.value = ("ia3",), True
    widget.button.click()
    widget.thread.join(LONG_WAIT)
    assert column_titles(widget) == ["<b>base</b>", "<b>ia3</b>"]
    assert widget.answers["ia3"] == runs["ia3"].generate(PROMPTS[1], max_new_tokens=10, chat_template=True)[0]


def test_an_error_shows_in_its_column_and_the_other_columns_still_answer(runs, try_it_module, monkeypatch):
    def failing(**kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(runs["lora"].model, "generate", failing)
    widget = try_it_module.TryIt(runs)
    widget.prompt.value, widget.max_new_tokens.value = PROMPTS[2], 10
    widget.button.click()
    widget.thread.join(LONG_WAIT)
    lora_column = widget.columns.children[1].children[1].value
    assert "RuntimeError: CUDA out of memory" in lora_column
    assert widget.answers["ia3"] == runs["ia3"].generate(PROMPTS[2], max_new_tokens=10)[0] != ""
    assert not widget.button.disabled


@pytest.mark.parametrize(("controls", "words"), [
    ({"sampling": True, "temperature": 0.0}, "temperature must be > 0 when sampling (got 0.0)"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1 (got 0)"),
    ({"prompt": ""}, "prompt must be a non-empty text"),
])
def test_a_bad_setting_shows_a_message_naming_it_and_starts_nothing(runs, try_it_module, no_loading, controls, words):
    widget = try_it_module.TryIt({name: open_run(run.record) for name, run in runs.items()})
    widget.prompt.value = PROMPTS[0]
    for name, value in controls.items():
        getattr(widget, name).value = value
    widget.button.click()
    assert words in html.unescape(widget.message.value)
    assert widget.thread is None and widget.columns.children == () and not widget.button.disabled
