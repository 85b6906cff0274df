"""The request type: every sampling option declared once, and each surface derived from it."""

import argparse
import dataclasses

import pytest

from tangshi_jax import evaluate, request, sample, serve
from tangshi_jax.errors import TangshiError, as_field, as_flag
from tangshi_jax.request import OPTIONS, PoemRequest

MACHINE_FLAGS = {"--json", "--checkpoint-dir", "--model", "--platform", "--help", "--data", "--list-tunes"}


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.option_strings[-1]: action for action in parser._actions if action.option_strings}


def test_the_cli_the_api_and_its_schema_name_the_same_options_with_the_same_defaults():
    cli = flags_of(sample.build_parser())
    fields = serve.poem_fields()
    schema = serve.openapi(fields)["paths"]["/api/poems"]["post"]["requestBody"]["content"]["application/json"]
    properties = schema["schema"]["properties"]
    assert set(cli) - MACHINE_FLAGS == {as_flag(name) for name in OPTIONS}
    assert list(fields) == list(properties) == [name for name in OPTIONS if OPTIONS[name].api is not None]
    # the API writes poems of one length (and 词 of the longest tune's)
    assert set(OPTIONS) - set(fields) == {"max_len"}
    declared = {field.name: field.default for field in dataclasses.fields(PoemRequest)}
    for name, spec in OPTIONS.items():
        cli_default = cli[as_flag(name)].default
        if spec.cli_default is request.AS_DECLARED:
            assert cli_default == declared[name], name
        else:
            assert name == "seed" and cli_default == 0 and declared[name] is None  # the CLI repeats by default
        assert cli[as_flag(name)].help == spec.help
        if name in fields:
            assert fields[name].default == declared[name] and fields[name].help == spec.help
            assert properties[name].get("default") == declared[name], name
            assert properties[name]["description"] == spec.help
    evaluate_flags = flags_of(evaluate.build_parser())
    for name in evaluate.SAMPLING:
        assert evaluate_flags[as_flag(name)].default == declared[name]


def test_api_bounds_equal_the_options_or_narrow_them_where_declared():
    fields = serve.poem_fields()
    properties = serve.openapi(fields)["paths"]["/api/poems"]["post"]["requestBody"]["content"]["application/json"]
    properties = properties["schema"]["properties"]
    for name, field in fields.items():
        spec = OPTIONS[name]
        narrow = spec.api
        for own, api, declared, tighter in (
            (spec.low, field.low, narrow.low, max),
            (spec.high, field.high, narrow.high, min),
            (spec.max_chars, field.max_chars, narrow.max_chars, min),
        ):
            if declared is None:
                assert api == own, name  # not narrowed: the option's own bound
            else:
                assert api == (declared if own is None else tighter(own, declared)), name
                assert own is None or tighter(own, api) == api, name  # never wider than the option's
        low_key = "exclusiveMinimum" if field.low_open else "minimum"
        assert properties[name].get(low_key) == field.low and properties[name].get("maximum") == field.high
        assert properties[name].get("maxLength") == field.max_chars
        assert properties[name].get("enum") == (list(spec.choices) if spec.choices else None)
    assert fields["num"].high == request.MAX_POEMS and serve.poem_fields(max_poems=4)["num"].high == 4
    assert fields["candidates"].high == request.MAX_CANDIDATES < OPTIONS["candidates"].high == request.MAX_ROWS


@pytest.mark.parametrize(
    "values, cli_message, api_message",
    [
        (dict(top_p=1.5), "--top-p must be above 0 and at most 1, got 1.5", "top_p must be above 0 and at most 1"),
        (dict(temperature=0.0), "--temperature must be above 0, got 0.0; use --greedy", "use greedy"),
        (dict(num=0), "--num must be at least 1, got 0", "num must be at least 1 and at most 16, got 0"),
        (dict(rhyme_group="东风"), None, "rhyme_group has 2 characters, more than 1"),
        (dict(title="春", keywords=("雨",)), "give --title or --keywords, not both", "give title or keywords"),
        (dict(keywords=(" ",)), "--keywords needs one or more words", "keywords needs one or more words"),
        (dict(form="sonnet"), "--form must be one of free, wujue", "form must be one of free, wujue"),
        (dict(repetition_penalty=float("inf")), "--repetition-penalty must be a finite number", "finite number"),
        (dict(repetition_penalty=11.0), None, "repetition_penalty must be at least 0 and at most 10, got 11.0"),
        (dict(seed=2**63), "--seed must be at least -9223372036854775808", "seed must be at least 0"),
        (dict(max_len=2000), "--max-len must be at least 1 and at most 1024", "max_len must be at least 1"),
    ],
)
def test_each_surface_refuses_a_value_in_its_own_words(values, cli_message, api_message):
    for surface, message in (("cli", cli_message), ("api", api_message)):
        if message is None:
            PoemRequest.checked(surface, **values)  # allowed here: only the other surface narrows it
            continue
        with pytest.raises(TangshiError) as error:
            PoemRequest.checked(surface, **values)
        worded = str(error.value) if surface == "cli" else error.value.worded(as_field)
        assert message in worded and "\n" not in worded, worded
        assert error.value.field in values
        if surface == "api":
            assert "--" not in worded


def test_checked_values_take_the_form_poem_request_holds():
    wanted = PoemRequest.checked("api", form="七绝", keywords=["春", "雨"], num=2)
    assert wanted.form == "qijue" and wanted.keywords == ("春", "雨") and wanted.topic == "春雨"
    assert PoemRequest.checked("cli", form="free").form is None
    assert PoemRequest(greedy=True, candidates=8, num=3).rows == 3 and PoemRequest(num=3).rows == 24


def test_requests_that_differ_in_per_poem_options_share_a_plan():
    one = PoemRequest(title="春", num=1, script="traditional", form="qijue")
    other = PoemRequest(keywords=("秋",), num=3, form="qijue")
    assert one.plan_key() == other.plan_key()
    assert one.plan_key() != dataclasses.replace(other, temperature=1.0).plan_key()
    assert one.plan_key() != dataclasses.replace(other, candidates=2).plan_key()
    per_poem = {name for name, spec in OPTIONS.items() if spec.per_poem}
    assert per_poem == {"title", "keywords", "num", "script"}


def test_a_users_text_never_breaks_the_message_that_quotes_it():
    vocab = ["G", "E", "，", "。", "春"]
    for text in ("{begin}", "{0}", "}{", "%s"):
        with pytest.raises(TangshiError) as error:
            sample.begin_ids(text, vocab, 64)
        assert "is not in the model's vocabulary" in str(error.value) and str(error.value).startswith("--begin")
        assert error.value.worded(as_field).startswith("begin character")
    plain = TangshiError("a message about no field keeps its {braces}")
    assert str(plain) == plain.worded(as_field) == "a message about no field keeps its {braces}"
