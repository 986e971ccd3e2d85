#!/usr/bin/env python3
"""Drives headless Chromium through fleetboot's dashboard over the WebDriver protocol
(chromedriver, plain HTTP: nothing to install beyond Debian's chromium-driver).

Run inside the server's network namespace by dashboard_e2e.rs:
  drive.py ADMIN_URL TOKEN_FILE OUT_DIR EXPECT_JSON [PANELS_JSON [STAGES_JSON]]

1. opens /dashboard without a session (must land on the login form), signs in with the
   token, and waits for the page's live updates to connect; writes OUT_DIR/ready;
2. waits (bounded) until every row in EXPECT_JSON {"<mac>": "<status>"} shows that
   status, read from the live page (no reload), and every panel of PANELS_JSON
   {"<panel>": "<data-key of a row>"} has that row (panels are pushed too), screenshots it;
3. goes through STAGES_JSON in order, each a list of (bounded) waits for panel rows:
   {"name": N, "rows": [{"panel": P, "key_prefix": K, "equal": {attr: value},
   "at_least": {attr: number}}]}: a stage is reached when, for every entry, a row of panel P
   whose data-key starts with K has `data-<attr>` equal to (or at least) those values; it
   then records those rows' data attributes and cells and writes OUT_DIR/stage-N (the test
   acts on that: it starts what makes the next stage's numbers move); screenshots the last;
4. opens the first MAC's timeline by clicking its link, screenshots it;
writes OUT_DIR/result.json with what it saw at each step. Exit 0 unless WebDriver
itself failed; the test judges what was seen."""
import json, os, subprocess, sys, tempfile, time, urllib.request, base64

admin, token_file, out, expect = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
want_panels = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
stages = json.loads(sys.argv[6]) if len(sys.argv) > 6 else []
PORT = 9515
WD = f"http://127.0.0.1:{PORT}"
result = {"steps": []}


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(WD + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"{}").get("value")


def save(name):
    png = call("GET", f"/session/{sid}/screenshot")
    with open(os.path.join(out, name), "wb") as f:
        f.write(base64.b64decode(png))


def js(script, *args):
    return call("POST", f"/session/{sid}/execute/sync", {"script": script, "args": list(args)})


def find(css):
    el = call("POST", f"/session/{sid}/element", {"using": "css selector", "value": css})
    return list(el.values())[0]


profile = tempfile.mkdtemp(prefix="fb-chromium-")
driver = subprocess.Popen(["chromedriver", f"--port={PORT}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
sid = None
try:
    for _ in range(100):
        try:
            call("GET", "/status")
            break
        except Exception:
            time.sleep(0.1)
    caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": "/usr/bin/chromium",
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,800"]}}}}
    sid = call("POST", "/session", caps)["sessionId"]

    call("POST", f"/session/{sid}/url", {"url": admin + "/dashboard"})
    result["steps"].append({"step": "no session", "url": call("GET", f"/session/{sid}/url"),
                            "has_form": js("return !!document.querySelector('input[name=token]')")})
    token = open(token_file).read().strip()
    call("POST", f"/session/{sid}/element/{find('input[name=token]')}/value", {"text": token})
    call("POST", f"/session/{sid}/element/{find('button[type=submit]')}/click", {})
    live = ""
    for _ in range(100):
        live = js("const e = document.getElementById('live'); return e ? e.textContent : ''")
        if live == "live":
            break
        time.sleep(0.1)
    result["steps"].append({"step": "signed in", "url": call("GET", f"/session/{sid}/url"), "live": live,
                            "rows": js("return document.querySelectorAll('#rows tr').length")})
    open(os.path.join(out, "ready"), "w").close()

    seen = {}
    deadline = time.time() + 120
    while time.time() < deadline:
        seen = js("""const o = {}; document.querySelectorAll('#rows tr').forEach(tr => {
            o[tr.id.slice(2)] = {status: tr.dataset.status, stage: tr.dataset.stage}; }); return o;""")
        panels = js("""const o = {}; document.querySelectorAll('#panels section').forEach(s => {
            o[s.id.slice(6)] = {configured: s.dataset.configured === 'true',
                                keys: Array.from(s.querySelectorAll('tr[data-key]')).map(tr => tr.dataset.key),
                                note: (s.querySelector('.note') || {}).textContent || ''}; }); return o;""")
        if all(seen.get(m, {}).get("status") == s for m, s in expect.items()) and \
                all(k in panels.get(p, {}).get("keys", []) for p, k in want_panels.items()):
            break
        time.sleep(0.25)
    result["steps"].append({"step": "rows", "seen": seen, "panels": panels,
                            "reloads": js("return performance.getEntriesByType('navigation').length")})
    save("dashboard.png")

    rows_js = """const o = []; document.querySelectorAll('#panels section').forEach(s => {
        s.querySelectorAll('tr[data-key]').forEach(tr => o.push({panel: s.id.slice(6), key: tr.dataset.key,
            data: Object.assign({}, tr.dataset), cells: Array.from(tr.cells).map(td => td.textContent)})); }); return o;"""

    def matches(row, want):
        if row["panel"] != want["panel"] or not row["key"].startswith(want["key_prefix"]):
            return False
        d = row["data"]
        return all(d.get(k) == str(v) for k, v in want.get("equal", {}).items()) and \
            all(d.get(k, "").isdigit() and int(d[k]) >= int(v) for k, v in want.get("at_least", {}).items())

    for stage in stages:
        found, deadline = None, time.time() + 60
        while time.time() < deadline:
            rows = js(rows_js)
            found = [next((r for r in rows if matches(r, w)), None) for w in stage["rows"]]
            if all(found):
                break
            time.sleep(0.25)
        reached = all(found)
        result["steps"].append({"step": "stage " + stage["name"], "reached": reached, "rows": found,
                                "seen": [r for r in js(rows_js) if r["panel"] in ("streams", "negotiators")] if not reached else [],
                                "reloads": js("return performance.getEntriesByType('navigation').length")})
        if not reached:
            break
        open(os.path.join(out, "stage-" + stage["name"]), "w").close()
    if stages:
        save("panels.png")

    first = next(iter(expect))
    link = find("#c-" + first.replace(":", "\\:") + " a")  # CSS needs the colons escaped
    call("POST", f"/session/{sid}/element/{link}/click", {})
    for _ in range(50):
        if js("return !!document.getElementById('timeline')"):
            break
        time.sleep(0.1)
    result["steps"].append({"step": "timeline", "url": call("GET", f"/session/{sid}/url"),
                            "events": js("return Array.from(document.querySelectorAll('#timeline tr.event td:nth-child(2)')).map(td => td.textContent)")})
    save("timeline.png")
except Exception as e:  # the test prints this with what was seen so far
    result["error"] = repr(e)
finally:
    if sid:
        try:
            call("DELETE", f"/session/{sid}")
        except Exception:
            pass
    driver.terminate()
    try:
        driver.wait(10)
    except subprocess.TimeoutExpired:
        driver.kill()
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
