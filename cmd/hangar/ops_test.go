package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool/api"
)

// The operator's files, relative to this package's directory.
var (
	dashboardPath  = filepath.Join("..", "..", "configs", "grafana", "hangar.json")
	alertsPath     = filepath.Join("..", "..", "configs", "prometheus", "alerts.yml")
	alertTestsPath = filepath.Join("..", "..", "configs", "prometheus", "alerts_test.yml")
	promConfigPath = filepath.Join("..", "..", "configs", "prometheus", "prometheus.yml")
	unitPath       = filepath.Join("..", "..", "configs", "systemd", "hangar.service")
)

// dashboard is the part of a Grafana dashboard the tests look at.
type dashboard struct {
	Title      string `json:"title"`
	UID        string `json:"uid"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"` // a string, or {"query": "…"}
		} `json:"list"`
	} `json:"templating"`
	Panels []dashboardPanel `json:"panels"`
}

type dashboardPanel struct {
	ID         int            `json:"id"`
	Type       string         `json:"type"`
	Title      string         `json:"title"`
	Datasource *dataSourceRef `json:"datasource"`
	Targets    []struct {
		RefID      string         `json:"refId"`
		Expr       string         `json:"expr"`
		Datasource *dataSourceRef `json:"datasource"`
	} `json:"targets"`
	Panels []dashboardPanel `json:"panels"` // a collapsed row's
}

type dataSourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// query is one PromQL expression of the dashboard and where it is.
type query struct{ where, expr string }

func loadDashboard(t *testing.T) (dashboard, []query) {
	t.Helper()
	data, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("%s is not a dashboard: %v", dashboardPath, err)
	}
	var qs []query
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				qs = append(qs, query{fmt.Sprintf("panel %d %q, target %s", p.ID, p.Title, tg.RefID), tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		switch q := v.Query.(type) {
		case string:
			if v.Type == "query" {
				qs = append(qs, query{"variable " + v.Name, q})
			}
		case map[string]any:
			if s, ok := q["query"].(string); ok {
				qs = append(qs, query{"variable " + v.Name, s})
			}
		}
	}
	return d, qs
}

// TestDashboardShape: the dashboard is importable as it is (every query
// goes through the data source variable, so no uid of someone's Grafana is
// baked in) and has the variables and panels operators filter by.
func TestDashboardShape(t *testing.T) {
	d, qs := loadDashboard(t)
	if d.Title == "" || d.UID == "" {
		t.Errorf("title %q, uid %q: both are needed to import and link the dashboard", d.Title, d.UID)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	for name, typ := range map[string]string{"datasource": "datasource", "pool": "query", "provider": "query"} {
		if vars[name] != typ {
			t.Errorf("variable %s is of type %q, want %q (variables: %v)", name, vars[name], typ, vars)
		}
	}
	ids := map[int]string{}
	panels := 0
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			if other, dup := ids[p.ID]; dup {
				t.Errorf("panels %q and %q share id %d", other, p.Title, p.ID)
			}
			ids[p.ID] = p.Title
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			panels++
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q: data source %+v, want uid ${datasource}", p.Title, p.Datasource)
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" || tg.RefID == "" || refs[tg.RefID] {
					t.Errorf("panel %q: target %q with expr %q (empty, or its refId repeated)", p.Title, tg.RefID, tg.Expr)
				}
				refs[tg.RefID] = true
				if tg.Datasource != nil && tg.Datasource.UID != "${datasource}" {
					t.Errorf("panel %q target %s: data source %+v, want uid ${datasource}", p.Title, tg.RefID, tg.Datasource)
				}
			}
		}
	}
	walk(d.Panels)
	if panels < 10 {
		t.Errorf("%d panels; the dashboard should show pools, leases, waits, boots, the cloud API and cost", panels)
	}
	if len(qs) == 0 {
		t.Error("no queries found")
	}
}

// TestDashboardQueriesParse: every query of the dashboard is valid PromQL
// once Grafana's variables are filled in. promtool parses them as the
// expressions of recording rules.
func TestDashboardQueriesParse(t *testing.T) {
	promtool := testutil.NeedTool(t, "promtool", "parses the dashboard's PromQL; apt-get install prometheus")
	_, qs := loadDashboard(t)
	fill := strings.NewReplacer("$__rate_interval", "5m", "$__range", "6h", "$pool", ".*", "$provider", ".*", "${datasource}", "prometheus")
	type rule struct {
		Record string `json:"record"`
		Expr   string `json:"expr"`
	}
	var rules []rule
	for i, q := range qs {
		if strings.HasPrefix(q.expr, "label_values(") {
			continue // Grafana's, not PromQL
		}
		rules = append(rules, rule{Record: fmt.Sprintf("dashboard:query_%d", i), Expr: fill.Replace(q.expr)})
	}
	// JSON is YAML: promtool reads it as a rules file.
	data, err := json.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	writeFile(t, path, string(data))
	if out, err := exec.Command(promtool, "check", "rules", path).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules on the dashboard's queries: %v\n%s\nqueries: %q", err, out, qs)
	}
}

// TestAlertRules: the rules load, and promtool's unit tests of them pass;
// every alert is tested both firing and quiet; the example Prometheus
// configuration is valid and loads the rules.
func TestAlertRules(t *testing.T) {
	promtool := testutil.NeedTool(t, "promtool", "checks and tests the alert rules; apt-get install prometheus")
	if out, err := exec.Command(promtool, "check", "rules", alertsPath).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules: %v\n%s", err, out)
	}
	// promtool resolves rule_files against the test file's directory.
	if out, err := exec.Command(promtool, "test", "rules", alertTestsPath).CombinedOutput(); err != nil {
		t.Errorf("promtool test rules: %v\n%s", err, out)
	}

	// The example configuration loads them. promtool opens the files it
	// names: the copy's token file is one of the test's.
	rules, err := os.ReadFile(alertsPath)
	if err != nil {
		t.Fatal(err)
	}
	promConfig, err := os.ReadFile(promConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	const tokenPath = "/etc/prometheus/hangar-token"
	if !strings.Contains(string(promConfig), tokenPath) {
		t.Fatalf("prometheus.yml no longer reads %s: change the test", tokenPath)
	}
	writeFile(t, filepath.Join(dir, "hangar-token"), "a-token-of-the-test")
	writeFile(t, filepath.Join(dir, "alerts.yml"), string(rules))
	writeFile(t, filepath.Join(dir, "prometheus.yml"), strings.ReplaceAll(string(promConfig), tokenPath, filepath.Join(dir, "hangar-token")))
	if out, err := exec.Command(promtool, "check", "config", filepath.Join(dir, "prometheus.yml")).CombinedOutput(); err != nil {
		t.Errorf("promtool check config on prometheus.yml: %v\n%s", err, out)
	} else if !strings.Contains(string(out), "SUCCESS: 1 rule files found") {
		t.Errorf("promtool check config on prometheus.yml did not load alerts.yml:\n%s", out)
	}

	tests, err := os.ReadFile(alertTestsPath)
	if err != nil {
		t.Fatal(err)
	}
	alerts := regexp.MustCompile(`(?m)^\s*- alert:\s*(\w+)\s*$`).FindAllStringSubmatch(string(rules), -1)
	if len(alerts) == 0 {
		t.Fatalf("no alerts found in %s", alertsPath)
	}
	fires, quiet := alertCases(string(tests))
	for _, a := range alerts {
		if fires[a[1]] == 0 || quiet[a[1]] == 0 {
			t.Errorf("alert %s: %d cases where it fires, %d where it stays quiet; want at least one of each", a[1], fires[a[1]], quiet[a[1]])
		}
	}
}

// alertCases counts, per alert, the evaluations of a promtool test file
// that expect it to fire and those that expect nothing. It reads the
// file's lines as alerts_test.yml writes them: "alertname: X", then
// "exp_alerts: []" for quiet, or "exp_alerts:" with alerts (or an alias
// of them) for firing.
func alertCases(tests string) (fires, quiet map[string]int) {
	fires, quiet = map[string]int{}, map[string]int{}
	name := ""
	for _, line := range strings.Split(tests, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "alertname:"):
			name = strings.TrimSpace(strings.TrimPrefix(line, "alertname:"))
		case strings.HasPrefix(line, "exp_alerts:") && name != "":
			if strings.TrimSpace(strings.TrimPrefix(line, "exp_alerts:")) == "[]" {
				quiet[name]++
			} else {
				fires[name]++
			}
			name = ""
		}
	}
	return fires, quiet
}

// metricNames are the Hangar metric names an expression or a file names.
func metricNames(s string) []string {
	var out []string
	for _, id := range regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`).FindAllString(s, -1) {
		if strings.HasPrefix(id, "hangar_") && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	return out
}

// exposition is a scrape of /metrics: the names it exports, histograms'
// and summaries' under their family name too, and its samples by series.
type exposition struct {
	names   map[string]bool
	samples map[string]float64 // `name{labels}` as exposed → value
}

func parseExposition(t *testing.T, text string) exposition {
	t.Helper()
	e := exposition{names: map[string]bool{}, samples: map[string]float64{}}
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) >= 4 && f[0] == "#" && f[1] == "TYPE" {
			e.names[f[2]] = true // a histogram's family name: its _bucket, _sum and _count follow
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("unreadable exposition line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("exposition line %q: %v", line, err)
		}
		series := line[:i]
		e.samples[series] = v
		e.names[series[:strings.IndexAny(series+"{", "{")]] = true
	}
	return e
}

// labelled reports whether metric has a series with label set.
func (e exposition) labelled(metric, label string) bool {
	for s := range e.samples {
		if rest, ok := strings.CutPrefix(s, metric+"{"); ok && (strings.HasPrefix(rest, label+`="`) || strings.Contains(rest, ","+label+`="`)) {
			return true
		}
	}
	return false
}

// TestOperatorMetricsExported: every metric the dashboard and the alerts
// name is one a running server exports, once it has done what each counts:
// a launch failed, a lease served and discarded (reaped). The cloud is
// the EC2 test server (on the local cloud), so that the request-level
// metrics only a real cloud API has are exported too. Queries of a metric
// labelled by pool or provider follow the dashboard's variable for it.
func TestOperatorMetricsExported(t *testing.T) {
	_, qs := loadDashboard(t)
	alerts, err := os.ReadFile(alertsPath)
	if err != nil {
		t.Fatal(err)
	}

	srv, _ := ec2Cloud(t)
	// No capacity anywhere: the first launch fails. Offerings that failed
	// are retried at once (capacity_retry), so that the next one succeeds.
	srv.SetCapacity(func(string, string, string) string { return "InsufficientInstanceCapacity" })
	cfg := ec2TOML(t.TempDir(), srv.URL(), "max_instances = 2\nmin_idle = 1")
	if !strings.Contains(cfg, "type = \"ec2\"\n") {
		t.Fatal("ec2TOML changed: set capacity_retry another way")
	}
	cfg = strings.Replace(cfg, "type = \"ec2\"\n", "type = \"ec2\"\ncapacity_retry = \"1ms\"\n", 1)
	start := time.Now()
	ts := startTest(t, cfg, nil)
	testutil.Eventually(t, "a launch to fail for capacity", 60*time.Second, func() bool {
		return strings.Contains(scrape(t, ts.url), `hangar_launch_errors_total{class="capacity",pool="ci"}`)
	})
	srv.SetCapacity(nil)
	l := ts.lease(t, api.LeaseRequest{Pool: "ci"})
	if err := ts.client.Release(context.Background(), l.ID, true); err != nil {
		t.Fatalf("release: %v", err)
	}
	testutil.Eventually(t, "the discarded instance to be reaped", 60*time.Second, func() bool {
		return strings.Contains(scrape(t, ts.url), `hangar_reaped_instances_total{pool="ci",reason="discard"}`)
	})
	text := scrape(t, ts.url)
	e := parseExposition(t, text)

	for _, q := range qs {
		for _, name := range metricNames(q.expr) {
			if !e.names[name] {
				t.Errorf("dashboard %s: %s is not exported\n  query: %s", q.where, name, q.expr)
			}
			for label, filter := range map[string]string{"pool": `pool=~"$pool"`, "provider": `provider=~"$provider"`} {
				if !strings.HasPrefix(q.where, "variable") && e.labelled(name, label) && !strings.Contains(q.expr, filter) {
					t.Errorf("dashboard %s: %s has a %s label but the query does not select %s\n  query: %s", q.where, name, label, filter, q.expr)
				}
			}
		}
	}
	names := metricNames(string(alerts))
	if len(names) == 0 {
		t.Fatalf("no hangar_ metric found in %s", alertsPath)
	}
	for _, name := range names {
		if !e.names[name] {
			t.Errorf("alerts.yml names %s, which is not exported", name)
		}
	}

	// The alerts' gauges read the server's state: it has reconciled since
	// it started, and no lease waits.
	if at := e.samples[`hangar_reconcile_last_success_timestamp_seconds{pool="ci"}`]; at < float64(start.Unix()) || at > float64(time.Now().Unix()+1) {
		t.Errorf("hangar_reconcile_last_success_timestamp_seconds = %v, want a moment of this test (from %d)", at, start.Unix())
	}
	if v, ok := e.samples[`hangar_lease_oldest_pending_seconds{pool="ci"}`]; !ok || v != 0 {
		t.Errorf("hangar_lease_oldest_pending_seconds = %v (exported %v), want 0 with no lease pending", v, ok)
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", grepLines(text, "hangar_"))
	}
}

// TestSystemdUnit: systemd accepts the unit (systemd-analyze verify, with
// ExecStart pointed at a real build of hangar), it keeps its sandbox
// (systemd-analyze security), and it runs serve with the documented config
// and no reload, which hangar does not support. verify exits 0 on a value
// it cannot parse and only says so: every line it prints about the unit
// counts, and a misspelt copy shows that such lines are caught.
func TestSystemdUnit(t *testing.T) {
	analyze := testutil.NeedTool(t, "systemd-analyze", "verifies the systemd unit; apt-get install systemd")
	data, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	unit := string(data)
	const execStart = "ExecStart=/usr/local/bin/hangar serve --config /etc/hangar/hangar.toml\n"
	for _, want := range []string{execStart, "StateDirectory=hangar\n", "DynamicUser=yes\n", "data_dir = \"/var/lib/hangar\""} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit lacks %q", want)
		}
	}
	if strings.Contains(unit, "\nExecReload=") {
		t.Error("the unit has an ExecReload, but hangar serve does not reload on a signal")
	}
	bin := hangarBinary(t)
	unit = strings.Replace(unit, "ExecStart=/usr/local/bin/hangar ", "ExecStart="+bin+" ", 1)

	check := func(t *testing.T, unit string) (complaints []string) {
		t.Helper()
		// systemd names the unit after its file.
		path := filepath.Join(t.TempDir(), "hangar.service")
		writeFile(t, path, unit)
		out, err := exec.Command(analyze, "verify", path).CombinedOutput()
		if err != nil {
			complaints = append(complaints, fmt.Sprintf("exit: %v", err))
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "hangar.service") {
				complaints = append(complaints, line)
			} else if strings.TrimSpace(line) != "" {
				t.Logf("systemd-analyze, about another unit: %s", line)
			}
		}
		return complaints
	}
	if c := check(t, unit); len(c) > 0 {
		t.Errorf("systemd-analyze verify:\n%s", strings.Join(c, "\n"))
	}
	if c := check(t, strings.Replace(unit, "ProtectHome=yes", "ProtectHome=maybe", 1)); len(c) == 0 {
		t.Error("a unit with ProtectHome=maybe passed the check: it cannot catch a bad value")
	}

	// Exposure is scored 0 (locked down) to 10; the unit scores about 1.3.
	// --threshold fails the command above 2.0, on a tenfold scale.
	path := filepath.Join(t.TempDir(), "hangar.service")
	writeFile(t, path, unit)
	if out, err := exec.Command(analyze, "security", "--offline=yes", "--threshold=20", path).CombinedOutput(); err != nil {
		t.Errorf("systemd-analyze security: %v: the sandbox was loosened\n%s", err, out)
	}
}
