"""Each node's definition as ComfyUI builds it in this process (what GET /object_info/<node> answers, without the
server) against the node's help page in web/docs/, which the frontend's help panel shows: the page's title is the
node's display name and it names every input and output the definition has. The e2e tier checks the same pages
over HTTP in the real frontend; this one runs beside the other node tests (and in the mutation run). Also: the
widgets that mirror ComfyUI's own take their spec, and a ComfyUI whose io.Schema has `search_aliases` (2026 builds,
simulated) gets every node's aliases."""
from __future__ import annotations

import dataclasses

import pytest

from conftest import NODE_IDS, REPO

from harness import comfyui

DOCS = REPO / "web" / "docs"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_describes_the_node_comfyui_lists(comfy, node_id):
    info = comfyui.node_info(comfy, node_id)
    page = (DOCS / f"{node_id}.md").read_text()
    assert info["name"] == node_id
    assert page.startswith(f"# {info['display_name']}\n"), (info["display_name"], page.splitlines()[0])
    names = [*info["input"].get("required", {}), *info["input"].get("optional", {}), *info["output_name"]]
    assert [n for n in names if f"`{n}`" not in page] == [], node_id
    # every input the page names as an input is one the node has (a renamed or removed input leaves the page stale)
    inputs = page.split("## Input", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1] for line in inputs.splitlines() if line.startswith("- `")}
    assert listed <= set(names), (node_id, listed - set(names))


def _stated_defaults(page: str) -> dict[str, str]:
    """{input: the default its help page states} from the page's Inputs list, in the forms the pages use:
    "(default 20, as ...)", "(default 1024 × 1024)" and "(default 0 to 1)" for a pair, "(default `dpm++ 2m`)",
    "`auto` (default)" / "`auto` (default: ...)" / "`dpm++ 2m` (default, ...)" / "0 (default)", "(default empty)"."""
    import re

    out = {}
    for line in page.split("## Input", 1)[1].split("\n## ", 1)[0].splitlines():
        if not line.startswith("- `") or "(default" not in line:
            continue
        names = re.findall(r"`([a-z_0-9]+)`", line.split(":", 1)[0])
        after = re.search(r"\(default ([^,;:)]+)", line)
        before = re.search(r"(`[^`]+`|-?[\d.]+) \(default[):,]", line)
        assert after or before, f"a default the test cannot read: {line}"
        text = after.group(1) if after else before.group(1)
        values = [v.strip().strip("`") for v in re.split(r" × | to ", text)]
        values = ["" if v == "empty" else v for v in values]
        assert len(values) in (1, len(names)), line
        out.update({n: values[0] if len(values) == 1 else values[i] for i, n in enumerate(names)})
    return out


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_default_a_help_page_states_is_the_widgets_default(comfy, node_id):
    """What the help panel says a widget starts at is what the node gives it (numbers compared as numbers)."""
    page = (DOCS / f"{node_id}.md").read_text()
    info = comfyui.node_info(comfy, node_id)
    wrong = {}
    for name, stated in _stated_defaults(page).items():
        default = _spec(info, name)[1].get("default")
        try:
            same = float(stated) == float(default)
        except (TypeError, ValueError):
            same = stated == default
        if not same:
            wrong[name] = (stated, default)
    assert wrong == {}, f"{node_id}: (page, node) {wrong}"


def test_the_help_pages_state_the_defaults_users_change_most():
    """The reading above finds the sampler's and the LoRA loader's stated defaults (a page rewritten in another
    form would otherwise check nothing)."""
    sampler = _stated_defaults((DOCS / "PixArtSigmaSampler.md").read_text())
    assert {k: sampler[k] for k in ("seed", "steps", "cfg", "scheduler", "width", "height", "denoise")} == {
        "seed": "0", "steps": "20", "cfg": "4.5", "scheduler": "dpm++ 2m", "width": "1024", "height": "1024",
        "denoise": "1.0"}
    assert _stated_defaults((DOCS / "PixArtSigmaLoraLoader.md").read_text()) == {"strength": "1.0",
                                                                                 "t5_strength": "1.0"}


def _spec(info: dict, name: str) -> tuple[str, dict]:
    """(type, options) of an input in an /object_info answer: a combo as ("COMBO", {"options": [...], ...}) in both
    the V1 form (a list of choices) and the V3 one."""
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    kind, *rest = inputs[name]
    opts = dict(rest[0]) if rest else {}
    if isinstance(kind, list):
        kind, opts["options"] = "COMBO", kind
    return kind, opts


ALL = ("default", "min", "max", "step", "round", "control_after_generate", "options")
# Widgets that do what a ComfyUI core widget does take that widget's spec (ComfyUI's nodes.py, read in this
# process): (our node, our input, ComfyUI's node, its input, the fields compared). The sampler's steps and cfg
# defaults are PixArt's (below); its steps stop at 1000, the scheduler's training timesteps.
COMFY_TWINS = [
    *[(node, "seed", "KSampler", "seed", ALL)
      for node in ("PixArtSigmaSampler", "PixArtSigmaSamplerAdvanced", "PixArtSigmaTiledRefine")],
    *[(node, "cfg", "KSampler", "cfg", ("min", "max", "step", "round"))
      for node in ("PixArtSigmaSampler", "PixArtSigmaSamplerAdvanced", "PixArtSigmaTiledRefine")],
    *[(node, "steps", "KSampler", "steps", ("default", "min"))
      for node in ("PixArtSigmaSampler", "PixArtSigmaSamplerAdvanced", "PixArtSigmaTiledRefine")],
    ("PixArtSigmaSampler", "denoise", "KSampler", "denoise", ALL),
    ("PixArtSigmaSamplerAdvanced", "add_noise", "KSamplerAdvanced", "add_noise", ALL),
    ("PixArtSigmaSamplerAdvanced", "start_step", "KSamplerAdvanced", "start_at_step", ALL),
    ("PixArtSigmaSamplerAdvanced", "end_step", "KSamplerAdvanced", "end_at_step", ALL),
    ("PixArtSigmaSamplerAdvanced", "return_with_leftover_noise", "KSamplerAdvanced", "return_with_leftover_noise", ALL),
    ("PixArtSigmaLoraLoader", "strength", "LoraLoader", "strength_model", ALL),
    ("PixArtSigmaLoraLoader", "t5_strength", "LoraLoader", "strength_clip", ALL),
    ("PixArtSigmaControlNetApply", "strength", "ControlNetApplyAdvanced", "strength", ALL),
    ("PixArtSigmaControlNetApply", "start_percent", "ControlNetApplyAdvanced", "start_percent", ALL),
    ("PixArtSigmaControlNetApply", "end_percent", "ControlNetApplyAdvanced", "end_percent", ALL),
]


@pytest.mark.parametrize("node,name,twin,twin_name,fields", COMFY_TWINS, ids=lambda v: v if isinstance(v, str) else "")
def test_widgets_that_mirror_comfyui_take_its_spec(comfy, node, name, twin, twin_name, fields):
    kind, ours = _spec(comfyui.node_info(comfy, node), name)
    twin_kind, theirs = _spec(comfyui.node_info(comfy, twin), twin_name)
    assert kind == twin_kind
    if twin_kind == "COMBO" and "default" not in theirs:
        theirs["default"] = theirs["options"][0]  # the frontend's default for a V1 combo: its first choice
    assert {f: ours.get(f) for f in fields} == {f: theirs.get(f) for f in fields}


@pytest.mark.parametrize("node", ["PixArtSigmaSampler", "PixArtSigmaSamplerAdvanced", "PixArtSigmaTiledRefine"])
def test_sampler_defaults_are_diffusers_pixart_sigma_pipeline_defaults(comfy, node):
    """steps and cfg as diffusers' PixArtSigmaPipeline.__call__ defaults them (20 and 4.5, the release's)."""
    import inspect

    from diffusers import PixArtSigmaPipeline

    call = inspect.signature(PixArtSigmaPipeline.__call__).parameters
    info = comfyui.node_info(comfy, node)
    assert _spec(info, "steps")[1]["default"] == call["num_inference_steps"].default
    assert _spec(info, "cfg")[1]["default"] == call["guidance_scale"].default


def _schema_fields() -> set[str]:
    from comfy_api.v0_0_2 import io

    return {f.name for f in dataclasses.fields(io.Schema)}


def test_a_schema_with_search_aliases_gets_them(comfy, monkeypatch):
    """A newer ComfyUI, simulated: io.Schema with the field 2026 builds added (`search_aliases: list[str]`)."""
    from comfy_api.v0_0_2 import io

    if "search_aliases" not in _schema_fields():
        newer = dataclasses.make_dataclass("Schema", [("search_aliases", list, dataclasses.field(default=None))],
                                           bases=(io.Schema,))
        monkeypatch.setattr(io, "Schema", newer)
    for node_id in NODE_IDS:
        schema = comfy.NODE_CLASS_MAPPINGS[node_id].define_schema()
        aliases = schema.search_aliases
        assert aliases and all(isinstance(a, str) and a for a in aliases), (node_id, aliases)
        # the plain-letters name: users type "sigma", the display names say "Σ"
        assert any(a.startswith("pixart sigma") for a in aliases), (node_id, aliases)
