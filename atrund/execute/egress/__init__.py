"""The egress path of a worker granted network: its own network namespace whose only way out is
the runner's proxy (policy.py decides, netns.py builds the namespace, dns.py answers its name
lookups, proxy.py carries its connections). See docs/threat-model.md §4."""
