#!/usr/bin/env python3
"""Turns a CustomResourceDefinition into strict JSON Schemas, one per served
version, for scripts/validate-deploy.sh: the CRD's openAPIV3Schema, with
`additionalProperties: false` on every object that lists its properties and
does not say `x-kubernetes-preserve-unknown-fields` (unknown fields refused,
as `kubectl apply --validate=strict` refuses them).

    scripts/crd-to-jsonschema.py CRD.yaml OUT_DIR   # writes OUT_DIR/<group>/<kind>_<version>.json
"""
import json
import os
import sys

import yaml


def caseless(pattern):
    """`abc` -> `[aA][bB][cC]` outside escapes and character classes."""
    out, in_class, escaped = [], False, False
    for ch in pattern:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            out.append(ch)
            escaped = True
        elif ch == "[":
            in_class = True
            out.append(ch)
        elif ch == "]":
            in_class = False
            out.append(ch)
        elif ch.isascii() and ch.isalpha() and not in_class:
            out.append(f"[{ch.lower()}{ch.upper()}]")
        else:
            out.append(ch)
    return "".join(out)


def strict(node):
    if isinstance(node, dict):
        # Go's regexp has inline flags (`^(?i)…`); JSON Schema patterns are
        # ECMA-262, which has none: spell case-insensitivity out.
        pattern = node.get("pattern")
        if isinstance(pattern, str) and "(?i)" in pattern:
            node["pattern"] = caseless(pattern.replace("(?i)", ""))
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
    return node


def main(crd_path, out_dir):
    with open(crd_path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for crd in docs:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            dest = os.path.join(out_dir, group, f"{kind.lower()}_{version['name']}.json")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w", encoding="utf-8") as out:
                json.dump(schema, out, indent=1, sort_keys=True)
                out.write("\n")
            print(dest)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
