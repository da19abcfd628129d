#!/usr/bin/env python3
"""Attributes a `redis-cli monitor` capture to the step that sent each
command: every EVALSHA/EVAL line owns the `[.. lua]` lines that follow it.
Usage: scripts/redis-attribute.py monitor.txt <payouts recorded>
(see scripts/redis-commands.sh and BENCHMARKS.md, #21)."""
import re, sys, collections
path, n = sys.argv[1], float(sys.argv[2])
line_re = re.compile(r'^\d+\.\d+ \[\d+ ([^\]]+)\] (.*)$')
tok_re = re.compile(r'"((?:[^"\\]|\\.)*)"')
calls = []  # (origin_cmd, args, [inner (cmd, args)])
for line in open(path, errors='replace'):
    m = line_re.match(line.strip())
    if not m:
        continue
    who, rest = m.groups()
    toks = tok_re.findall(rest)
    if not toks:
        continue
    cmd = toks[0].upper()
    if who == 'lua':
        if calls:
            calls[-1][2].append((cmd, toks[1:]))
        continue
    calls.append((cmd, toks[1:], []))

def classify(cmd, args, inner):
    inner_cmds = [c for c, _ in inner]
    keys = ' '.join(a for _, aa in inner for a in aa[:1]) + ' ' + ' '.join(args[:3])
    if cmd in ('EVALSHA', 'EVAL'):
        s = set(inner_cmds)
        if 'HSETNX' in s: return 'apalis push'
        if 'HGETALL' in s or 'ZRANGEBYSCORE' in s or 'LRANGE' in s: return 'apalis fetch'
        if 'SISMEMBER' in s: return 'apalis start'
        if 'SREM' in s and 'HSET' in s: return 'apalis ack'
        if 'SPOP' in s: return 'ours: janitor'
        if ':lock:' in keys and 'DEL' in s: return 'ours: lock release'
        if ':lock:' in keys and 'PEXPIRE' in s: return 'ours: lock renewal'
        if ':lock:' in keys: return 'ours: lock (other script)'
        if ':gateway:' in keys: return 'ours: gateway guard script'
        if 'ZSCORE' in s or 'ZADD' in s or 'ZCOUNT' in s: return 'apalis heartbeat/register/orphans'
        if 'INFO' in s: return 'ours: epoch check'
        if ':leader' in keys or 'leader' in keys: return 'ours: leadership'
        return 'script other: ' + ','.join(sorted(s))[:60]
    if cmd == 'SET' and args and ':lock:' in args[0]: return 'ours: lock SET NX PX'
    if cmd == 'PTTL': return 'ours: fleet pause read (PTTL)'
    if cmd == 'DEL' and args and ':lock:' in args[0]: return 'ours: clear locks'
    return 'client other: ' + cmd

tot = collections.Counter(); rt = collections.Counter()
for cmd, args, inner in calls:
    k = classify(cmd, args, inner)
    if cmd == 'SCRIPT' or cmd == 'INFO' and not inner:
        k = 'bench/loading: ' + cmd
    tot[k] += 1 + len(inner)
    rt[k] += 1
allc = sum(tot.values())
print(f'| step | commands | per payout | calls (round trips) per payout |')
print('|---|---|---|---|')
for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
    print(f'| {k} | {v} | {v/n:.2f} | {rt[k]/n:.3f} |')
print(f'| **total** | {allc} | **{allc/n:.2f}** | {sum(rt.values())/n:.3f} |')
