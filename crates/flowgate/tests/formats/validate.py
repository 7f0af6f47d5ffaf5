"""Validates event records against the published schemas (used by tests/event_formats.rs).

Reads JSON lines on stdin, each {"format": "eve" | "ocsf", "record": {...}}; validates EVE
records against Suricata's EVE schema (argv[1]) and OCSF records against OCSF 1.8.0's
network_activity class with the security_control profile (from the ocsf-json-schema package),
both with jsonschema's draft 2020-12 validator. Prints one line per invalid record and a summary
line "validated N eve, M ocsf, K invalid"; exits 1 if any record is invalid.
"""
import json
import sys

import jsonschema
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

OCSF_VERSION = "1.8.0"

with open(sys.argv[1]) as f:
    eve = jsonschema.Draft202012Validator(json.load(f))
ocsf_schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))
ocsf = jsonschema.Draft202012Validator(
    ocsf_schema.get_class_schema(class_name="network_activity", profiles=["security_control"])
)

counts = {"eve": 0, "ocsf": 0}
invalid = 0
for n, line in enumerate(sys.stdin, 1):
    item = json.loads(line)
    validator = {"eve": eve, "ocsf": ocsf}[item["format"]]
    errors = sorted(validator.iter_errors(item["record"]), key=lambda e: list(e.path))
    counts[item["format"]] += 1
    if errors:
        invalid += 1
        for e in errors:
            where = "/".join(str(p) for p in e.path)
            print(f"line {n} ({item['format']}): at /{where}: {e.message}")
print(f"validated {counts['eve']} eve, {counts['ocsf']} ocsf, {invalid} invalid")
sys.exit(1 if invalid else 0)
