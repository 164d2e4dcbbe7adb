"""Decodes an OTLP ExportProfilesServiceRequest (the file named by argv[1])
with PyPI's opentelemetry-proto and prints, one fact a line, what the sinks
test checks: resource attributes (sorted), the scope, whether every
dictionary table starts with its zero value, and per profile its sample
type, time and duration, then each sample's stack (function names, leaf
first) and values."""
import sys

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def main():
    request = profiles_service_pb2.ExportProfilesServiceRequest()
    with open(sys.argv[1], "rb") as f:
        request.ParseFromString(f.read())
    d = request.dictionary
    s = d.string_table
    zero_first = s[0] == "" and not any(
        table[0].ListFields()
        for table in (d.mapping_table, d.location_table, d.function_table,
                      d.stack_table, d.attribute_table)
    )
    print(f"zero entries first: {zero_first}")

    def stack(index):
        names = []
        for loc in d.stack_table[index].location_indices:
            for line in d.location_table[loc].lines:
                names.append(s[d.function_table[line.function_index].name_strindex])
        return ";".join(names)

    for rp in request.resource_profiles:
        for a in sorted(rp.resource.attributes, key=lambda a: a.key):
            print(f"resource {a.key}={value(a.value)}")
        for sp in rp.scope_profiles:
            print(f"scope {sp.scope.name}")
            for p in sp.profiles:
                print(f"profile {s[p.sample_type.type_strindex]}/{s[p.sample_type.unit_strindex]}"
                      f" at {p.time_unix_nano} for {p.duration_nano}")
                for x in p.samples:
                    print(f"  {stack(x.stack_index)} {' '.join(map(str, x.values))}")


main()
