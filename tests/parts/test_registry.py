"""The registry is the one place that knows parts by name: everything else asks a spec."""
import ast
import os

import pytest

from megatron_p2t import parts
from tests.conftest import ROOT

ROLES = ("encoder", "connector", "decoder")


def _names():
    return set(parts.ENCODERS) | set(parts.CONNECTORS) | set(parts.DECODERS)


def _name_comparisons(path: str):
    """Comparisons of a part's name with a string (`connector == "mlp"`, `x.get("encoder") != "none"`,
    `decoder in ("llama", ...)`) and tables keyed by part names, in one file."""
    tree = ast.parse(open(path).read(), path)
    names, found = _names(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            literals = [o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)]
            literals += [e.value for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                         for e in o.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            others = " ".join(ast.unparse(o) for o in operands if not isinstance(o, ast.Constant))
            if any(n in names for n in literals) and any(r in others for r in ROLES):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if len(keys & set(parts.CONNECTORS)) >= 2 or len(keys & set(parts.ENCODERS) - {"none"}) >= 2:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: a table keyed by part names")
    return found


def test_no_code_outside_the_registry_compares_part_names():
    found = []
    for top in ("megatron_p2t", "bench"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            if os.path.relpath(d, ROOT).startswith(os.path.join("megatron_p2t", "parts")):
                continue
            found += [x for f in files if f.endswith(".py") for x in _name_comparisons(os.path.join(d, f))]
    assert not found, "ask the part's spec (megatron_p2t.parts) instead:\n" + "\n".join(found)


def test_the_check_itself_sees_a_comparison(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('if cfg.model.connector == "resampler":\n    pass\n'
                   'x = info.get("encoder") != "esm2_structure"\nWORDS = {"mlp": 1, "mlp2x_gelu": 2}\n')
    assert len(_name_comparisons(str(bad))) == 3


def test_a_name_is_taken_once_and_an_unknown_one_says_how_to_add_it():
    with pytest.raises(ValueError, match="model.connector='mlp' is registered already"):
        parts.register(parts.ConnectorSpec(name="mlp", summary="another", slots=lambda r, m: r))
    parts.register(parts.CONNECTORS["mlp"])           # the same spec again: a module imported twice
    with pytest.raises(ValueError, match=r"model.encoder='esm3' is not a part.*esm2 \(.*imports"):
        parts.encoder("esm3")


def test_every_built_in_part_declares_what_the_system_asks():
    for spec in parts.CONNECTORS.values():
        if spec.build is None:                        # decoder-only: no connector, no slots
            assert spec.slots(300, None) == 0 and spec.adapter is None
            continue
        a = spec.adapter
        assert spec.run and a and a.directory and a.tensors and a.slices and a.config and a.load and a.run
    for spec in parts.ENCODERS.values():
        assert spec.build is not None or not spec.reads_protein
    for spec in parts.DECODERS.values():
        assert spec.tensors and spec.slices


def test_an_unimportable_module_in_imports_is_named():
    from megatron_p2t.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"imports: cannot import 'no_such_parts_module'"):
        load_config(None, ["imports=[no_such_parts_module]"])
