"""``nvidia-smi -q`` text and ``nvidia-smi -q -x`` XML -> one tree of (key, value) nodes.

Where from: the dump ``collectors.nvsmi.parse_nvsmi`` is handed (a file for ``breakfix signals nvsmi``, the node
agent's own ``nvidia-smi -q``). Where to: ``collectors.nvsmi``, which reads each GPU's fields from the tree. Keys are
normalised (``ECC Errors`` and ``<ecc_errors>`` are both ``ecc_errors``); the GPUs are the root's ``gpu`` children,
each log (``-l N`` prints one per interval, ``-q -x -l N`` one XML document per interval) after a ``nvsmi_log``
marker, and a log's ``Attached GPUs`` / ``<attached_gpus>`` is a root child of that log too. Text: a GPU header may be
indented (a dump pasted into an issue or a heredoc), a line cut mid-way is dropped. XML: a document cut short keeps
every element read before the cut (its marker's value is ``truncated``), and entity declarations are refused.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

MAX_NODES = 200_000
_KV = re.compile(r"^(?P<indent> *)(?P<key>\S.*?)\s+:\s?(?P<value>.*?)\s*$")
_GPU = re.compile(r"^\s*GPU (?P<bus>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\s*$")


class NvsmiFormatError(ValueError):
    """Not ``nvidia-smi -q`` output."""


@dataclass
class Node:
    key: str
    value: str = ""
    children: list[Node] = field(default_factory=list)

    def get(self, path: str) -> Node | None:
        node: Node | None = self
        for part in path.split("/"):
            node = next((c for c in node.children if c.key == part), None) if node else None
        return node

    def all(self, key: str) -> list[Node]:
        return [c for c in self.children if c.key == key]


def norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")


def flatten(node: Node) -> list[Node]:
    """Every node under ``node``, depth first, without recursion (a text dump's depth is its indentation)."""
    out: list[Node] = []
    todo = list(reversed(node.children))
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(reversed(c.children))
    return out


def _text_tree(text: str) -> Node:
    """Every ``NVSMI LOG`` of a text dump as one tree: each banner adds a ``nvsmi_log`` marker to the root, so the
    GPUs of ``nvidia-smi -q -l N`` (one log per interval) can be told apart. A GPU header may be indented (a dump
    pasted into an issue or a shell heredoc): its children are the lines indented deeper than it."""
    root = Node("")
    stack: list[tuple[int, Node]] = [(-1, root)]
    count = 0
    lines = text.expandtabs(4).splitlines()
    if lines and not text.endswith(("\n", "\r")):
        lines.pop()  # a dump cut mid-line (a capture killed on a hung GPU): a half-written value is no reading
    for raw in lines:
        if not raw.strip() or len(raw) > 4096:
            continue
        count += 1
        if count > MAX_NODES:
            break
        indent = len(raw) - len(raw.lstrip(" "))
        if raw.lstrip().startswith("="):
            if "NVSMI LOG" in raw:
                root.children.append(Node("nvsmi_log"))
                stack = [(-1, root)]
            continue
        if m := _GPU.match(raw):
            node = Node("gpu", m.group("bus"))
            root.children.append(node)
            stack = [(-1, root), (indent, node)]
            continue
        m = _KV.match(raw)
        node = Node(norm(m.group("key")), m.group("value")) if m else Node(norm(raw), "")
        while len(stack) > 1 and stack[-1][0] >= indent:
            stack.pop()
        stack[-1][1].children.append(node)
        stack.append((indent, node))
    return root


def _xml_doc(text: str) -> tuple[Node, bool]:
    """One ``nvidia-smi -q -x`` document -> (tree, cut short). A document cut off mid-way (nvidia-smi killed by a
    timeout on a hung GPU, a capture truncated on copy) keeps every element read before the cut, so its complete
    GPUs are read and the ``attached_gpus`` count says what is missing; anything that is no ``nvidia_smi_log``
    document is refused."""
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start",))
    root: ET.Element | None = None
    cut = False
    try:
        parser.feed(text)
        parser.close()
    except ET.ParseError:
        cut = True
    try:
        for event in parser.read_events():
            if root is None and isinstance(event[-1], ET.Element):
                root = event[-1]
    except ET.ParseError:
        cut = True
    if root is None or root.tag != "nvidia_smi_log":
        raise NvsmiFormatError("not nvidia-smi -q -x XML: no <nvidia_smi_log> document")

    def conv(e: ET.Element, depth: int = 0) -> Node:
        n = Node(norm(e.tag), (e.text or "").strip())
        n.children = [conv(c, depth + 1) for c in e] if depth < 32 else []  # nvsmi_device_v13.dtd nests 6 deep
        if n.key == "gpu":
            n.value = e.get("id", "")
        return n

    return conv(root), cut


# Where XML documents start: nvidia-smi -q -x prints "Unable to determine the device handle ..." for a GPU it cannot
# open before the document (captured with 2>&1), and ``-q -x -l N`` prints one document per interval.
_XML_START = re.compile(r"<\?xml\b|<!DOCTYPE\s+nvidia_smi_log|<nvidia_smi_log\b")
_XML_DECL = re.compile(r"<\?xml\b")
_XML_ROOT = re.compile(r"(?:<!DOCTYPE\s+nvidia_smi_log[^>]*>\s*)?<nvidia_smi_log\b")


def _xml_tree(text: str) -> Node:
    """Every XML document of a dump as one tree, in the shape ``_text_tree`` gives (a ``nvsmi_log`` marker before
    each document's children, its value ``truncated`` when the document was cut short)."""
    if "<!ENTITY" in text:
        raise NvsmiFormatError("XML entity declarations are not nvidia-smi output")
    docs = [m.start() for m in _XML_DECL.finditer(text)] or [m.start() for m in _XML_ROOT.finditer(text)]
    if not docs:
        raise NvsmiFormatError("not nvidia-smi -q -x XML: no <nvidia_smi_log> document")
    root = Node("")
    for i, at in enumerate(docs[:64]):
        tree, cut = _xml_doc(text[at:docs[i + 1] if i + 1 < len(docs) else len(text)])
        root.children.append(Node("nvsmi_log", "truncated" if cut else ""))
        root.children.extend(tree.children)
    return root


def is_xml(text: str) -> bool:
    """``-q -x`` XML: it starts with ``<``, or an XML document follows lines nvidia-smi printed before it."""
    head = text.lstrip()
    return head.startswith("<") or ("NVSMI LOG" not in text and _XML_START.search(text) is not None)


def parse_tree(text: str) -> Node:
    """The whole dump as one tree; GPUs are the root's ``gpu`` children, each log (``-l N`` prints one per
    interval) after a ``nvsmi_log`` marker."""
    text = text.removeprefix("\ufeff")
    if is_xml(text):
        return _xml_tree(text)
    return _text_tree(text)
