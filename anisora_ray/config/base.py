"""The base of every config section, and small sections several components share."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

GIB = 2**30


def ray_request(resources: dict[str, float], memory_gib: float) -> dict[str, float]:
    """A request in Ray's resource names with ``memory`` in bytes (as Ray counts it), zeros left out."""
    return {k: v for k, v in {**resources, "memory": float(int(memory_gib * GIB))}.items() if v > 0}


class Section(BaseModel):
    """Base of all config sections: unknown keys are errors, assignments are validated, and a number field refuses
    a boolean (YAML reads ``on``/``off``/``yes``/``no`` as booleans, which pydantic would take as 1 and 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # an infinite weight: NaN rewards

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value, info: ValidationInfo):
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            kinds = _scalar_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got the boolean {value} (YAML reads on/off/yes/no as "
                                 "booleans: give a number)")
        return value


class ActorResources(Section):
    """What one actor asks Ray for."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    # host memory Ray reserves for the actor on its node (0: none reserved), e.g. an offloaded generator replica
    # (generator.offload = model) that keeps its whole pipeline in host memory between calls
    memory_gib: float = Field(default=0.0, ge=0)

    def request(self) -> dict[str, float]:
        """The actor's request as a placement bundle (Ray's resource names; ``memory`` in bytes), zeros left out."""
        return ray_request({"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}, self.memory_gib)

    def ray_options(self) -> dict:
        """The keyword arguments of ``.options()`` (an actor) or ``map_batches`` (a Ray Data actor pool)."""
        memory = self.request().get("memory")
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources),
                **({"memory": int(memory)} if memory else {})}


def _scalar_types(annotation) -> set:
    """The plain types a field's annotation admits (through unions, Optional and Annotated)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _scalar_types(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in args))
    return {annotation} if isinstance(annotation, type) else set()


def amount(key: str, value: float) -> str:
    """A Ray resource amount as people read it: ``memory`` (bytes in Ray) in GiB."""
    return f"{value / GIB:.3g} GiB" if key in ("memory", "object_store_memory") else f"{value:g}"


def readable(resources: dict[str, float]) -> str:
    """Ray resources (a request, a node's or the cluster's) with amounts as people read them."""
    return "{" + ", ".join(f"'{k}': {amount(k, v)}" for k, v in resources.items()) + "}"


class LoraConfig(Section):
    r: int = Field(default=0, ge=0)  # 0: no LoRA (frozen backbone, features cached once)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
