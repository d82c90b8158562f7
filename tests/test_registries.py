"""Registries refuse a duplicate name unless ``overwrite=True``, and leave the registry as it was."""

import pytest
from torch import nn

from captum_vlm.adapters import CLIPAdapter, VLMAdapter, get_adapter, register_adapter
from captum_vlm.adapters.base import _REGISTRY
from captum_vlm.explain import METHODS, register_method


def test_adapter_duplicate_refused_then_overwritten():
    class Toy(nn.Module):
        pass

    @register_adapter
    class ToyAdapter(VLMAdapter):
        family = "toy"
        model_classes = ("Toy",)

    class OtherToyAdapter(VLMAdapter):
        family = "toy2"
        model_classes = ("Toy",)

    try:
        assert register_adapter(ToyAdapter) is ToyAdapter  # the same class again: nothing changes
        with pytest.raises(ValueError, match=r"Toy \(by ToyAdapter\).*overwrite=True"):
            register_adapter(OtherToyAdapter)
        assert type(get_adapter(Toy())) is ToyAdapter  # refused: the registry is unchanged
        assert register_adapter(overwrite=True)(OtherToyAdapter) is OtherToyAdapter
        assert type(get_adapter(Toy())) is OtherToyAdapter
    finally:
        del _REGISTRY["Toy"]


def test_adapter_for_a_builtin_class_refused():
    class MyClip(VLMAdapter):
        family = "myclip"
        model_classes = ("CLIPModel",)

    with pytest.raises(ValueError, match="CLIPModel \\(by CLIPAdapter\\)"):
        register_adapter(MyClip)
    assert _REGISTRY["CLIPModel"] is CLIPAdapter
    with pytest.raises(TypeError, match="overwrite: expected a bool"):
        register_adapter(overwrite="yes")
    with pytest.raises(TypeError, match="VLMAdapter subclass"):
        register_adapter(int)


def test_method_duplicate_refused_then_overwritten():
    def first(context):
        return []

    def second(context):
        return []

    register_method("toy-method", summary="s", limits="l", families=["clip"])(first)
    try:
        with pytest.raises(ValueError, match="'toy-method' is already registered.*overwrite=True"):
            register_method("toy-method", summary="s", limits="l", families=["clip"])(second)
        assert METHODS["toy-method"].run is first
        register_method("toy-method", summary="s2", limits="l", families=["clip"], overwrite=True)(second)
        assert METHODS["toy-method"].run is second and METHODS["toy-method"].summary == "s2"
        with pytest.raises(ValueError, match="'grad-eclip' is already registered"):
            register_method("grad-eclip", summary="s", limits="l", families=["clip"])
    finally:
        del METHODS["toy-method"]
    with pytest.raises(ValueError, match="name: expected a non-empty string"):
        register_method("", summary="s", limits="l", families=["clip"])


def test_every_supported_class_declares_registered_default_methods():
    """``explain()`` without ``methods`` uses the adapter's declared default (the zoo ranking, or the
    analogous family's), never the fallback "first method that fits"."""
    import tiny_models as tm

    from captum_vlm.explain.evidence import default_methods
    from captum_vlm.explain.registry import method_names

    wanted = {"CLIPModel": ["relevancy"], "SiglipModel": ["grad-eclip"]}  # their zoo rankings
    for class_name, factory in tm.FACTORIES.items():
        adapter = get_adapter(factory())
        registered = method_names(adapter)
        assert adapter.default_methods, class_name
        assert set(adapter.default_methods) <= set(registered), class_name
        if not adapter.two_tower:  # fusion and generative: the BLIP ranking (theirs or by analogy)
            assert default_methods(adapter, registered) == ["bimodal-relevancy"], class_name
        elif class_name in wanted:
            assert default_methods(adapter, registered) == wanted[class_name], class_name
