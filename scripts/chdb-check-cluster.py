#!/usr/bin/env python3
"""Cluster-mode SQL on current ClickHouse: runs vidpulse's cluster DDL and `_final` views in chdb
(ClickHouse 26.x embedded; `pip install chdb`) fed with the rows a database on the local 18.16
cluster holds, and compares every view's result with 18.16's. Not part of scripts/test (no chdb
in CI); run it after a cluster test that kept its database:

    VIDPULSE_TEST_KEEP_DATABASE=1 cargo test --release -p vidpulse-e2e --test clickhouse_cluster -- --nocapture
    scripts/chdb-check-cluster.py vpt_<…>_chcluster <topic prefix>   # both printed by the test

What it checks: every statement `vidpulse-aggregator --print-ddl --clickhouse-cluster vidpulse` prints
parses on 26.x (`formatQuery`, ON CLUSTER and ReplicatedReplacingMergeTree as printed); the same
statements run there (without ON CLUSTER and with plain ReplacingMergeTree: chdb has no Keeper) on a
cluster `vidpulse` of one local shard; the 18.16 rows (every version, every shard) inserted through
the Distributed tables give, view by view, the same final values as the 18.16 cluster.
"""
import os, tempfile
import re, subprocess, sys, urllib.request, chdb
db, prefix = sys.argv[1], sys.argv[2]
def ch18(q):
    req = urllib.request.Request("http://127.0.0.1:" + os.environ.get("VIDPULSE_CH_CLUSTER_HTTP_PORT", "8131") + "/?output_format_json_quote_64bit_integers=0", data=q.encode())
    return urllib.request.urlopen(req).read().decode()
ddl = subprocess.run([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target/release/vidpulse-aggregator"), "--print-ddl", "--clickhouse-cluster", "vidpulse",
                      "--clickhouse-database", db, "--topic-prefix", prefix], capture_output=True, text=True, check=True).stdout
stmts = [s.strip() for s in ddl.split(";\n") if s.strip()]
stmts = [s[:-1] if s.endswith(";") else s for s in stmts]
work = tempfile.mkdtemp(prefix="vp-chdb-")
with open(os.path.join(work, "config.xml"), "w") as f:
    f.write("""<clickhouse><tcp_port>9000</tcp_port>
  <remote_servers><vidpulse><shard><internal_replication>true</internal_replication>
    <replica><host>localhost</host><port>9000</port></replica></shard></vidpulse></remote_servers>
  <macros><shard>01</shard><replica>r1</replica></macros></clickhouse>""")
c = chdb.connect(f"file:{work}/db?config-file={work}/config.xml")
cur = c.cursor()
def q(sql):
    cur.execute(sql)
    return cur.fetchall()
print("chdb", q("SELECT version()")[0][0], "|", len(stmts), "statements")
for s in stmts:  # 1. every statement, as printed, parses on 26.x
    q("SELECT formatQuery(%s)" % ("'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"))
print("all statements parse (formatQuery), ON CLUSTER and ReplicatedReplacingMergeTree included")
q(f"DROP DATABASE IF EXISTS `{db}`")
for s in stmts:  # 2. run them: no Keeper here, so the replicated engine becomes its plain twin
    s = s.replace(" ON CLUSTER `vidpulse`", "")
    s = re.sub(r"ReplicatedReplacingMergeTree\('[^']*', '\{replica\}', version\)", "ReplacingMergeTree(version)", s)
    q(s)
tables = [r.strip() for r in ch18(f"SELECT name FROM system.tables WHERE database = '{db}' AND engine = 'Distributed' ORDER BY name").split()]
rows = 0
for t in tables:  # 3. the 18.16 cluster's rows (every version, all shards) into the Distributed table
    data = ch18(f"SELECT * FROM `{db}`.`{t}` FORMAT JSONEachRow")
    rows += data.count("\n")
    if data:
        cur.execute(f"INSERT INTO `{db}`.`{t}` SETTINGS distributed_foreground_insert=1 FORMAT JSONEachRow " + data)
print(f"{rows} rows of {len(tables)} tables copied")
bad = 0
n = 0
for t in tables:  # 4. final values: 26.x through Distributed == 18.16 cluster
    a = sorted(ch18(f"SELECT * FROM `{db}`.`{t}_final` FORMAT TSV").splitlines())
    b = sorted(str(c.query(f"SELECT * FROM `{db}`.`{t}_final`", "TSV")).splitlines())
    n += len(a)
    if a != b:
        bad += 1
        print("DIFF", t, len(a), len(b), a[:2], b[:2])
print(("views equal" if bad == 0 else f"{bad} views differ") + f" ({n} result rows compared)")
sys.exit(1 if bad else 0)
