"""YAML from users, read safely: yaml.SafeLoader plus limits (alias expansion, nesting, duplicate keys), and
short reprs of user input for error messages."""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

MAX_YAML_NODES = 100_000  # after alias expansion (a real modelfile has a few hundred)
MAX_YAML_DEPTH = 64

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 6, 6, 3


def short(value: Any, limit: int = 200) -> str:
    """repr() of user input for a message, at most `limit` characters (an expanded alias can be megabytes)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class YAMLLimitError(yaml.YAMLError):
    """A document over the loader's limits (see SafeLimitedLoader)."""


class SafeLimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with limits: the document may not expand past MAX_YAML_NODES nodes once every alias
    is counted at each use (a "billion laughs" file of 1 KB expands to 10^9), may not nest deeper than
    MAX_YAML_DEPTH, may not hold a recursive alias, and a mapping may not repeat a key (PyYAML would keep
    the last one silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(f"nesting deeper than {MAX_YAML_DEPTH} levels at line {mark.line + 1}; a modelfile needs 4")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._sizes.get(id(node))
        if alias:
            self._aliases += 1
            if size is None:
                raise YAMLLimitError(f"recursive alias at line {mark.line + 1} (an anchor used inside itself)")
            return node
        if size is None:
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes.get(id(c), 1) for c in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        if size > MAX_YAML_NODES and not self._aliases:
            raise YAMLLimitError(
                f"more than {MAX_YAML_NODES:,} values (near line {mark.line + 1}); a modelfile "
                f"holds a few hundred: is this the right file?"
            )
        if size > MAX_YAML_NODES:
            raise YAMLLimitError(
                f"its aliases expand to more than {MAX_YAML_NODES:,} values ({self._aliases} "
                f"aliases, near line {mark.line + 1}); that is a YAML 'billion laughs', not a "
                f"modelfile: remove the nested &anchors/*aliases"
            )
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # unhashable: SafeConstructor says so with its own message
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {short(key)} (first at line {first.line + 1}); YAML would keep only "
                        f"the last one: remove or rename one",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str):
    """yaml.safe_load with SafeLimitedLoader's limits."""
    loader = SafeLimitedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
