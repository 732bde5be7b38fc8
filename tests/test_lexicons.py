"""The lexicon files are the contract; the Python models must say exactly the same thing."""

import json
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

import atrund.gateway
from atrund import records

LEXICONS = Path(__file__).resolve().parent.parent / "lexicons"

MODELS = {
    "dev.atrun.defs#permissions": records.Permissions,
    "dev.atrun.defs#metrics": records.Metrics,
    "dev.atrun.defs#httpResponse": records.HttpResponse,
    "dev.atrun.defs#limits": records.Limits,
    "dev.atrun.defs#sealedSecret": records.SealedSecret,
    "dev.atrun.defs#secretsKey": records.SecretsKey,
    "dev.atrun.bundle": records.Bundle,
    "dev.atrun.invocation": records.Invocation,
    "dev.atrun.result": records.Result,
    "dev.atrun.runner": records.Runner,
    "dev.atrun.schedule": records.Schedule,
    "dev.atrun.trigger": records.Trigger,
    "dev.atrun.invoke#input": atrund.gateway.InvokeInput,
}
REFS = {records.StrongRef: "com.atproto.repo.strongRef"} | {m: k for k, m in MODELS.items() if "#" in k}


def load_all() -> dict[str, dict]:
    docs = {}
    for path in LEXICONS.rglob("*.json"):
        doc = json.loads(path.read_text())
        docs[doc["id"]] = doc
        assert path.relative_to(LEXICONS).with_suffix("").parts == tuple(doc["id"].split(".")), path
    return docs


def object_def(docs: dict, name: str) -> dict:
    nsid, _, frag = name.partition("#")
    if frag in ("input", "output"):
        return docs[nsid]["defs"]["main"][frag]["schema"]
    d = docs[nsid]["defs"][frag or "main"]
    return d["record"] if d["type"] == "record" else d


def lexicon_type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Annotated:  # a type with a validator (records.Text): its base type
        return lexicon_type(typing.get_args(annotation)[0])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        assert len(args) == 1, annotation
        return lexicon_type(args[0])
    origin = typing.get_origin(annotation)
    if origin is list:
        return "array"
    if origin is dict or annotation is typing.Any:
        return "unknown"
    if origin is typing.Literal or annotation is str:
        return "string"
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is records.BlobRef:
        return "blob"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "ref:" + REFS[annotation]
    raise AssertionError(f"no lexicon type for {annotation}")


def test_every_lexicon_is_a_valid_v1_document():
    docs = load_all()
    assert set(docs) == {"dev.atrun.defs", "dev.atrun.bundle", "dev.atrun.invocation", "dev.atrun.result", "dev.atrun.runner",
                         "dev.atrun.invoke", "dev.atrun.getLogs", "dev.atrun.getState", "dev.atrun.schedule",
                         "dev.atrun.trigger"}
    for nsid, doc in docs.items():
        assert doc["lexicon"] == 1
        for name, d in doc["defs"].items():
            assert d["type"] in {"record", "object", "token", "string", "procedure", "query"}
            if d["type"] == "procedure":
                objects = [d["input"]["schema"], d["output"]["schema"]]
            elif d["type"] == "query":
                objects = [d["parameters"], d["output"]["schema"]]
            else:
                objects = [d.get("record", d)]
            for obj in objects:
                _check_object(nsid, name, obj)


def _check_object(nsid: str, name: str, obj: dict) -> None:
    for prop, spec in obj.get("properties", {}).items():
        assert isinstance(spec.get("type"), str), f"{nsid}#{name}.{prop}"
        assert spec["type"] != "float" and spec["type"] != "number", "the data model has no floats"
    assert set(obj.get("required", [])) <= set(obj.get("properties", {})), f"{nsid}#{name}"


def test_record_keys_are_as_documented():
    docs = load_all()
    keys = {n: docs[n]["defs"]["main"]["key"] for n in docs if docs[n]["defs"].get("main", {}).get("type") == "record"}
    assert keys == {"dev.atrun.bundle": "tid", "dev.atrun.invocation": "tid", "dev.atrun.result": "any", "dev.atrun.runner": "literal:self",
                    "dev.atrun.schedule": "tid", "dev.atrun.trigger": "tid"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_lexicon(name):
    obj = object_def(load_all(), name)
    model = MODELS[name]
    fields = {f.alias or n: f for n, f in model.model_fields.items()}
    assert set(fields) == set(obj["properties"]), f"{name}: properties differ"
    required = {a for a, f in fields.items() if f.is_required()}
    assert required == set(obj.get("required", [])), f"{name}: required fields differ"
    for alias, field in fields.items():
        spec = obj["properties"][alias]
        want = spec["type"] + (":" + spec["ref"].replace("#main", "") if spec["type"] == "ref" else "")
        assert lexicon_type(field.annotation) == want, f"{name}.{alias}"


MINIMAL = {
    "dev.atrun.bundle": {"runtime": "python", "createdAt": "2026-12-06T00:00:00.000Z",
                         "code": {"$type": "blob", "mimeType": "text/x-python", "size": 3,
                                  "ref": {"$link": "bafkreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}},
    "dev.atrun.invocation": {"runner": "did:plc:r", "endpoint": "main", "createdAt": "2026-12-06T00:00:00.000Z",
                             "bundle": {"uri": "at://did:plc:a/dev.atrun.bundle/b",
                                        "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}},
    "dev.atrun.schedule": {"runner": "did:plc:r", "endpoint": "main", "createdAt": "2026-12-06T00:00:00.000Z", "cron": "0 * * * *",
                           "bundle": {"uri": "at://did:plc:a/dev.atrun.bundle/b",
                                      "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}},
    "dev.atrun.trigger": {"runner": "did:plc:r", "endpoint": "main", "createdAt": "2026-12-06T00:00:00.000Z",
                          "collections": ["app.bsky.feed.like"],
                          "bundle": {"uri": "at://did:plc:a/dev.atrun.bundle/b",
                                     "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}},
}


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_every_string_max_length_of_the_lexicon_is_enforced(name):
    """Each string property with a maxLength in the lexicon is taken at the limit and refused one
    byte over, by the model the runner validates records with."""
    props = object_def(load_all(), name)["properties"]
    model = MODELS[name]
    limited = {k: v["maxLength"] for k, v in props.items() if v["type"] == "string" and "maxLength" in v}
    assert limited, name
    for field, limit in limited.items():
        model.model_validate({**MINIMAL[name], field: "x" * limit})
        with pytest.raises(ValueError):
            model.model_validate({**MINIMAL[name], field: "x" * (limit + 1)})
