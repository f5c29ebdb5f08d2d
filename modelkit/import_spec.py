"""The pure half of `python -m modelkit import`: what the user declared + what the model says -> a
checked model spec. No TensorFlow, OpenVINO or ONNX here: the readers in `modelkit.importer` turn a
model file into `ModelFacts`, and everything below is plain data, tested without any framework.

Precedence, lowest first: a Hugging Face `preprocessor_config.json`, the spec file (`--spec`, JSON
or YAML, any part of ModelSpec.to_dict()), the flags. What nobody declared is filled from the model
(input name, size, channels, layout, fixed batch; output name and width; labels from ONNX
metadata_props), then from defaults (colour from channels, softmax over N units, sigmoid over one).
A declaration that contradicts the model is refused in one line naming both sides, e.g.
`output.class_names has 3 names (--labels) but the model's output 'logits' [?, 4] is 4 wide`.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from modelspec.errors import SpecError
from modelspec.spec import InputSpec, ModelSpec, OutputSpec, PreprocessSpec

FORMATS = ("keras", "saved_model", "onnx", "tflite")
SECTIONS = {"input": InputSpec, "preprocess": PreprocessSpec, "output": OutputSpec}
# ONNX metadata_props keys exporters use for class names, tried in this order (case-insensitive).
LABEL_KEYS = ("labels", "class_names", "classes", "names", "id2label")
_COLOR_CHANNELS = {"gray": 1, "rgb": 3, "bgr": 3}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as the model declares it. shape: None for unknown rank; a None
    dimension is dynamic."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str = "float32"

    def describe(self) -> str:
        shape = "unknown shape" if self.shape is None else "[" + ", ".join(
            "?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name!r} {shape}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ModelFacts:
    """What a model file says about itself."""

    format: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    labels: tuple[str, ...] = ()
    labels_origin: str = ""  # e.g. "ONNX metadata_props 'labels'"

    @property
    def conventional_layout(self) -> str:
        """The layout the format's exporters usually write, for inputs whose shape cannot tell."""
        return "NCHW" if self.format == "onnx" else "NHWC"


# --- What the user declared -------------------------------------------------------------------

def empty_declared() -> dict[str, dict[str, Any]]:
    return {section: {} for section in SECTIONS}


def declared_from_file(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """A spec file's content (parsed JSON or YAML): any part of ModelSpec.to_dict(), keys checked."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must hold a mapping with input, preprocess and/or output, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SpecError(f"{where} has unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    declared = empty_declared()
    for section, values in raw.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise SpecError(f"{where} section {section!r} must be a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(SECTIONS[section])}
        bad = sorted(set(values) - known)
        if bad:
            raise SpecError(f"{where} {section} has unknown key(s) {', '.join(bad)} "
                            f"(known: {', '.join(sorted(known))})")
        declared[section].update(values)
    return declared


def declared_from_hf(preprocess: PreprocessSpec, height: int, width: int) -> dict[str, dict[str, Any]]:
    """modelspec.hf.preprocess_from_hf's answer as declarations."""
    declared = empty_declared()
    declared["preprocess"] = {f.name: getattr(preprocess, f.name) for f in fields(PreprocessSpec)}
    declared["input"] = {"height": height, "width": width}
    return declared


def merge_declared(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers override earlier ones, key by key."""
    merged = empty_declared()
    for layer in layers:
        for section, values in layer.items():
            merged[section].update({key: value for key, value in values.items() if value is not None})
    return merged


# Flags of `python -m modelkit import` (click parameter names) -> the spec key each declares.
FLAG_KEYS = {
    "input_name": ("input", "name"), "layout": ("input", "layout"), "color": ("input", "color"),
    "resize": ("preprocess", "resize"), "resize_shorter_to": ("preprocess", "resize_shorter_to"),
    "interpolation": ("preprocess", "interpolation"), "letterbox_fill": ("preprocess", "letterbox_fill"),
    "scale": ("preprocess", "scale"), "offset": ("preprocess", "offset"), "mean": ("preprocess", "mean"),
    "std": ("preprocess", "std"), "output_name": ("output", "name"), "kind": ("output", "kind"),
    "activation": ("output", "activation"), "labels": ("output", "class_names"),
    "threshold": ("output", "threshold"), "top_k": ("output", "top_k"),
}


def declared_from_flags(values: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Flag values (None: not given) -> declarations, and "section.key" -> the flag that said it.
    Text values are parsed here: --scale 1/255, --mean 0.485,0.456,0.406, --size 224x224,
    --labels cat,dog (a labels file's content comes as `labels_text`)."""
    declared, origin = empty_declared(), {}
    for flag, value in values.items():
        if value is None or flag == "labels_text":
            continue
        option = "--" + flag.replace("_", "-")
        if flag == "size":
            height, width = parse_size(str(value))
            declared["input"].update(height=height, width=width)
            origin.update({"input.height": option, "input.width": option})
            continue
        if flag not in FLAG_KEYS:
            raise SpecError(f"unknown import flag {option}")
        section, key = FLAG_KEYS[flag]
        if flag in ("scale", "offset"):
            value = parse_number(str(value), option)
        elif flag in ("mean", "std"):
            value = parse_floats(str(value), option)
        elif flag == "labels":
            value = tuple(part.strip() for part in str(value).split(",") if part.strip())
        declared[section][key] = value
        origin[f"{section}.{key}"] = option
    if values.get("labels_text") is not None:
        if values.get("labels") is not None:
            raise SpecError("give --labels or --labels-file, not both")
        declared["output"]["class_names"] = values["labels_text"]
        origin["output.class_names"] = "--labels-file"
    return declared, origin


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' -> floats; each may be a fraction like 1/255."""
    try:
        return tuple(parse_number(part, option) for part in text.split(",") if part.strip())
    except SpecError:
        raise SpecError(f"{option} {text!r}: give comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def parse_number(text: str, option: str) -> float:
    """'0.5', '-1' or a fraction '1/255' (exact: scale factors are often written so)."""
    numerator, slash, denominator = str(text).strip().partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise SpecError(f"{option} {text!r} is not a number (a fraction like 1/255 is fine)") from None
    if not math.isfinite(value):
        raise SpecError(f"{option} {text!r} is not a finite number")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """'224x224' or '224' -> (height, width)."""
    height, _, width = text.lower().partition("x")
    try:
        size = (int(height), int(width or height))
    except ValueError:
        raise SpecError(f"--size {text!r}: give HEIGHTxWIDTH, e.g. 224x224") from None
    if min(size) < 1:
        raise SpecError(f"--size {text!r} must be positive")
    return size


def parse_labels_text(text: str, where: str) -> tuple[str, ...]:
    """A labels file: a JSON list (or {index: name} mapping), else one name per line."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            return _labels_from_value(json.loads(stripped), where)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{where} looks like JSON but does not parse: {exc}") from None
    return tuple(line.strip() for line in stripped.splitlines() if line.strip())


def labels_from_metadata(props: dict[str, str]) -> tuple[tuple[str, ...], str]:
    """Class names from ONNX metadata_props, and the key they came from; ((), "") when none.

    Values seen in the wild: a JSON list, a JSON {"0": "cat"} mapping, a Python dict literal
    (Ultralytics' "names"), or comma-separated names."""
    by_lower = {key.lower(): key for key in props}
    for wanted in LABEL_KEYS:
        key = by_lower.get(wanted)
        if key is None or not str(props[key]).strip():
            continue
        text = str(props[key]).strip()
        value: Any
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
        return _labels_from_value(value, f"ONNX metadata_props {key!r}"), f"ONNX metadata_props {key!r}"
    return (), ""


def _labels_from_value(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, dict):
        try:
            ordered = sorted((int(index), str(name)) for index, name in value.items())
        except (TypeError, ValueError):
            raise SpecError(f"{where}: a mapping of class names needs integer keys (index -> name)") from None
        if [index for index, _ in ordered] != list(range(len(ordered))):
            raise SpecError(f"{where}: class indices {[i for i, _ in ordered]} are not 0..{len(ordered) - 1}")
        return tuple(name for _, name in ordered)
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    raise SpecError(f"{where}: expected a list of class names, got {type(value).__name__}")


# --- Declared + model -> spec ---------------------------------------------------------------------

def assemble_spec(declared: dict[str, dict[str, Any]], facts: ModelFacts,
                  origin: dict[str, str] | None = None) -> tuple[ModelSpec, dict[str, str]]:
    """The checked spec, and where each key came from ("model", "default", or the declaration's
    origin: a flag name, the spec file, ...). `origin` maps "section.key" to that name for
    declared keys (default "spec"). Raises SpecError naming both sides of a disagreement."""
    origin = dict(origin or {})
    said = {section: dict(declared.get(section) or {}) for section in SECTIONS}
    unknown = sorted(set(declared) - set(SECTIONS))
    if unknown:
        raise SpecError(f"unknown spec section(s) {', '.join(unknown)}")
    origins: dict[str, str] = {f"{s}.{k}": origin.get(f"{s}.{k}", "spec") for s in said for k in said[s]}

    def who(key: str) -> str:
        return origins.get(key, "spec")

    i, o = said["input"], said["output"]
    tensor = _the_input(facts, i, who)
    _input_from_model(i, tensor, facts, origins, who)
    out = _the_output(facts, o, who)
    _output_from_model(o, out, facts, origins, who)
    for section, values in said.items():
        for key in values:
            origins.setdefault(f"{section}.{key}", "default")
    try:
        spec = ModelSpec(
            input=InputSpec(**_tuples(i)),
            preprocess=PreprocessSpec(**_tuples(said["preprocess"])),
            output=OutputSpec(**_tuples(o)),
        )
    except TypeError as exc:
        raise SpecError(f"spec: {exc}") from None
    for section, kind in SECTIONS.items():
        for f in fields(kind):
            origins.setdefault(f"{section}.{f.name}", "default")
    return spec.validated(), dict(sorted(origins.items()))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {key: tuple(value) if key in ("mean", "std", "class_names") else value for key, value in values.items()}


def _the_input(facts: ModelFacts, i: dict[str, Any], who) -> TensorInfo:
    if len(facts.inputs) != 1:
        listed = ", ".join(t.describe() for t in facts.inputs) or "none"
        raise SpecError(f"the model has {len(facts.inputs)} inputs ({listed}): an image classifier takes one "
                        "image input")
    tensor = facts.inputs[0]
    if "name" in i and i["name"] != tensor.name:
        raise SpecError(f"input.name {i['name']!r} ({who('input.name')}) is not the model's input: "
                        f"the model takes {tensor.describe()}")
    if tensor.dtype != "float32":
        raise SpecError(f"the model's input {tensor.describe()} takes {tensor.dtype}; the spec feeds float32 "
                        "(a quantized or integer-input model: import its float32 version)")
    if tensor.shape is None or len(tensor.shape) != 4:
        rank = "unknown" if tensor.shape is None else len(tensor.shape)
        raise SpecError(f"the model's input {tensor.describe()} has rank {rank}: an image input has rank 4 "
                        "(batch, height, width, channels as NHWC or NCHW)")
    return tensor


def _input_from_model(i: dict[str, Any], tensor: TensorInfo, facts: ModelFacts, origins: dict[str, str], who) -> None:
    shape = tensor.shape
    assert shape is not None
    i.setdefault("name", tensor.name)
    origins.setdefault("input.name", "model")
    positions = {"NHWC": (1, 2, 3), "NCHW": (2, 3, 1)}  # (height, width, channels) indices
    fits = {layout: shape[positions[layout][2]] in (1, 3, None) for layout in positions}
    if "layout" in i:
        layout = i["layout"]
        if layout not in positions:
            raise SpecError(f"input.layout is {layout!r} ({who('input.layout')}): one of {', '.join(positions)}")
        if not fits[layout]:
            other = "NCHW" if layout == "NHWC" else "NHWC"
            hint = (f"; the model's input reads as {other} ({shape[positions[other][2]]} channels): declare {other}"
                    if fits[other] else "; an image input has 1 or 3 channels")
            raise SpecError(f"input.layout {layout} ({who('input.layout')}) puts {shape[positions[layout][2]]} "
                            f"channels in the model's input {tensor.describe()}{hint}")
    else:
        candidates = [layout for layout in positions if fits[layout] and shape[positions[layout][2]] is not None]
        if len(candidates) == 1:
            layout = candidates[0]
        elif fits[facts.conventional_layout]:
            layout = facts.conventional_layout  # both (or neither, with a dynamic channel) read as images
        else:
            raise SpecError(f"cannot tell the layout of the model's input {tensor.describe()}: neither NHWC nor NCHW "
                            "gives 1 or 3 channels (is it an image input?)")
        i["layout"] = layout
        origins["input.layout"] = "model"
    h_at, w_at, c_at = positions[layout]
    channels = shape[c_at]
    if channels is not None:
        if "channels" in i and i["channels"] != channels:
            raise SpecError(f"input.channels {i['channels']} ({who('input.channels')}) but the model's input "
                            f"{tensor.describe()} has {channels} channel(s) ({layout})")
        color = i.get("color")
        if color in _COLOR_CHANNELS and _COLOR_CHANNELS[color] != channels:
            raise SpecError(f"input.color {color} ({who('input.color')}) declares {_COLOR_CHANNELS[color]} "
                            f"channel(s) but the model's input {tensor.describe()} has {channels} ({layout})")
        i.setdefault("channels", channels)
        origins.setdefault("input.channels", "model")
    elif "channels" not in i:
        if i.get("color") in _COLOR_CHANNELS:
            i["channels"] = _COLOR_CHANNELS[i["color"]]
            origins["input.channels"] = who("input.color")
        else:
            raise SpecError(f"the model's input {tensor.describe()} has a dynamic channel dimension: "
                            "declare the colour (gray, rgb or bgr)")
    if "color" not in i:
        i["color"] = "gray" if i["channels"] == 1 else "rgb"
        origins["input.color"] = "default"
    for key, at in (("height", h_at), ("width", w_at)):
        size = shape[at]
        if size is None:
            if key not in i:
                raise SpecError(f"the model's input {tensor.describe()} has a dynamic {key}: "
                                "declare the size it was trained at (--size HEIGHTxWIDTH)")
        elif key in i and i[key] != size:
            raise SpecError(f"input size {i.get('height', shape[h_at])}x{i.get('width', shape[w_at])} "
                            f"({who('input.' + key)}) but the model's input {tensor.describe()} is "
                            f"{shape[h_at]}x{shape[w_at]} ({layout})")
        else:
            i[key] = size
            origins.setdefault(f"input.{key}", "model")
    batch = shape[0]
    if batch is not None:
        if i.get("batch") is not None and i["batch"] != batch:
            raise SpecError(f"input.batch {i['batch']} ({who('input.batch')}) but the model's input "
                            f"{tensor.describe()} has a fixed batch of {batch}")
        i["batch"] = batch
        origins["input.batch"] = "model"
    i.setdefault("dtype", "float32")


def _the_output(facts: ModelFacts, o: dict[str, Any], who) -> TensorInfo:
    listed = ", ".join(t.describe() for t in facts.outputs) or "none"
    if "name" in o:
        for tensor in facts.outputs:
            if tensor.name == o["name"]:
                return tensor
        raise SpecError(f"output.name {o['name']!r} ({who('output.name')}) is not an output of the model "
                        f"(outputs: {listed})")
    if len(facts.outputs) != 1:
        raise SpecError(f"the model has {len(facts.outputs)} outputs ({listed}): name the one with the class "
                        "scores (--output-name)")
    return facts.outputs[0]


def output_width(tensor: TensorInfo) -> int | None:
    """Numbers per image: the product of the non-batch dimensions (1 for a [batch] output)."""
    if tensor.shape is None or not tensor.shape:
        return None
    rest = tensor.shape[1:]
    if any(d is None for d in rest):
        return None
    return math.prod(rest) if rest else 1


def _output_from_model(o: dict[str, Any], tensor: TensorInfo, facts: ModelFacts, origins: dict[str, str], who) -> None:
    o.setdefault("name", tensor.name)
    origins.setdefault("output.name", "model")
    if tensor.dtype != "float32":
        raise SpecError(f"the model's output {tensor.describe()} is {tensor.dtype}; engines return float32 scores")
    width = output_width(tensor)
    if "units" in o and width is not None and o["units"] != width:
        raise SpecError(f"output.units {o['units']} ({who('output.units')}) but the model's output "
                        f"{tensor.describe()} is {width} wide")
    if "class_names" not in o:
        if facts.labels:
            o["class_names"] = tuple(facts.labels)
            origins["output.class_names"] = facts.labels_origin or "model"
        else:
            wide = f"{width} wide" if width is not None else "of unknown width"
            raise SpecError(f"no class names: the model's output {tensor.describe()} is {wide}; give --labels "
                            "a,b,c or --labels-file FILE (or output.class_names in --spec)")
    names = tuple(o["class_names"])
    source = origins.get("output.class_names", "spec")
    if width is not None:
        if width == 1 and len(names) != 2:
            raise SpecError(f"output.class_names has {len(names)} names ({source}) but the model's output "
                            f"{tensor.describe()} is 1 wide: one unit scores class_names[1] against class_names[0], "
                            "so give 2 names")
        if width != 1 and width != len(names):
            raise SpecError(f"output.class_names has {len(names)} names ({source}) but the model's output "
                            f"{tensor.describe()} is {width} wide (one score per class)")
        o["units"] = width
        origins.setdefault("output.units", "model")
    units = o.get("units", 1 if len(names) == 2 and o.get("activation") == "sigmoid" else len(names))
    activation = o.get("activation")
    if activation == "sigmoid" and units != 1:
        raise SpecError(f"output.activation sigmoid ({who('output.activation')}) scores one unit but the model's "
                        f"output {tensor.describe()} is {units} wide: use softmax")
    if activation == "softmax" and units == 1:
        raise SpecError(f"output.activation softmax ({who('output.activation')}) over the model's one-unit output "
                        f"{tensor.describe()} is always 1: use sigmoid")
    if "top_k" not in o:
        o["top_k"] = min(5, len(names))
        origins["output.top_k"] = "default"
    if "kind" not in o:
        o["kind"] = "probabilities" if activation == "none" else "logits"
        origins["output.kind"] = "default"
    if activation is None:
        o["activation"] = "none" if o["kind"] == "probabilities" else ("sigmoid" if units == 1 else "softmax")
        origins["output.activation"] = "default"


# --- Checks on what the model computes ------------------------------------------------------------

def check_outputs(values, spec: ModelSpec, what: str) -> None:
    """(n, units) outputs of the source run on the import's inputs, against the spec's output.
    `values` is array-like; plain Python here (numpy is the caller's)."""
    rows = [list(map(float, row)) for row in values]
    o = spec.output
    if rows and len(rows[0]) != o.width:
        raise SpecError(f"the spec's output {o.name!r} has {o.width} unit(s) ({len(o.class_names)} classes) "
                        f"but {what} gave {len(rows[0])} numbers per image")
    if any(not math.isfinite(v) for row in rows for v in row):
        raise SpecError(f"{what} gave NaN or infinite outputs on valid inputs: the model or its conversion is broken")
    if o.kind != "probabilities":
        return
    low = min(v for row in rows for v in row)
    high = max(v for row in rows for v in row)
    if low < -1e-6 or high > 1 + 1e-6:
        raise SpecError(f"output.kind probabilities but {what} gave values in [{low:.4g}, {high:.4g}], outside "
                        "[0, 1]: declare --kind logits (with --activation softmax or sigmoid)")
    if o.width > 1:
        sums = [sum(row) for row in rows]
        worst = max(sums, key=lambda s: abs(s - 1))
        if abs(worst - 1) > 1e-3:
            raise SpecError(f"output.kind probabilities but a row of {what} sums to {worst:.4g}, not 1: "
                            "declare --kind logits --activation softmax")


def describe_spec(spec: ModelSpec, origins: dict[str, str] | None = None) -> str:
    """One line for the CLI: what the model takes, how pixels are prepared, what it gives."""
    i, p, o = spec.input, spec.preprocess, spec.output
    resize = p.resize + (f" {p.resize_shorter_to}" if p.resize == "shorter_side_crop" and p.resize_shorter_to else "") \
        + (f" fill {p.letterbox_fill}" if p.resize == "letterbox" else "")
    batch = f", fixed batch {i.batch}" if i.batch else ""
    labels_from = f" from {origins['output.class_names']}" if origins and origins.get(
        "output.class_names", "").startswith("ONNX") else ""
    if o.width == 1:
        decision = f"{'sigmoid' if o.activation == 'sigmoid' else 'one probability'}, threshold {o.threshold:g}"
    elif o.activation == "softmax":
        decision = f"softmax over {o.width}"
    else:
        decision = f"{o.width} probabilities"
    return (f"{spec.summary()}{batch}; {resize} {p.interpolation}; x*{p.scale:.6g}{p.offset:+g}, mean "
            f"{list(p.mean)}, std {list(p.std)}; {o.kind} {o.name!r} -> {decision} "
            f"({', '.join(o.class_names)}){labels_from}; top-{o.top_k}")
