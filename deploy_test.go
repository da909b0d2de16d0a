package main

// Tests that keep deploy/ and the build true: the dashboard and the alert rules name only metrics
// a real gateway exports (and the dashboard all of them), the rules pass promtool, the nginx
// template passes nginx -t and carries chat and voice through to two gateways, the compose and
// Kubernetes files name only settings the gateway knows, with ports that match their peers; the
// image and the README's build facts.
//
// promtool (Debian's prometheus package) and nginx are real: the tests skip without them, with
// an install hint, unless VOICEGATE_REQUIRE_TOOLS=1 (as in CI), where they fail instead.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
	"gopkg.in/yaml.v3"
)

func runTool(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
	return string(out)
}

func readDeploy(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("deploy", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// yamlDocs decodes every document of a YAML file into generic values.
func yamlDocs(t *testing.T, name string) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(readDeploy(t, name)))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return docs
			}
			t.Fatalf("deploy/%s: %v", name, err)
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
}

// settingNames are the variables the gateway reads.
func settingNames() map[string]bool {
	out := map[string]bool{}
	for _, s := range settings() {
		out[s.env] = true
	}
	return out
}

// portOf returns the port of a host:port address or URL.
func portOf(t *testing.T, addr string) string {
	t.Helper()
	if u, err := url.Parse(addr); err == nil && u.Host != "" {
		addr = u.Host
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%q has no port: %v", addr, err)
	}
	return port
}

var (
	promString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	promMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promLabel    = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	promRange    = regexp.MustCompile(`\[[^\]]*\]`)
	promGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	promIdent    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	grafanaVar   = regexp.MustCompile(`\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?`)
)

// promKeyword reports whether an identifier is a PromQL keyword rather than a metric name.
func promKeyword(s string) bool {
	switch strings.ToLower(s) {
	case "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan":
		return true
	}
	return false
}

// promNames returns the metric names and the label names an expression refers to. It is a
// small scanner, not a parser: enough for the expressions deploy/ writes (matchers, ranges,
// grouping clauses, functions, arithmetic).
func promNames(expr string) (metrics, labels []string) {
	for _, m := range promMatchers.FindAllString(expr, -1) {
		for _, l := range promLabel.FindAllStringSubmatch(promString.ReplaceAllString(m, `""`), -1) {
			labels = append(labels, l[1])
		}
	}
	e := promMatchers.ReplaceAllString(promString.ReplaceAllString(expr, `""`), " ")
	e = promRange.ReplaceAllString(e, " ")
	for _, g := range promGrouping.FindAllStringSubmatch(e, -1) {
		for _, l := range strings.Split(g[1], ",") {
			if l = strings.TrimSpace(l); l != "" {
				labels = append(labels, l)
			}
		}
	}
	e = promGrouping.ReplaceAllString(e, " ")
	e = grafanaVar.ReplaceAllString(e, " ")
	for _, loc := range promIdent.FindAllStringIndex(e, -1) {
		name := e[loc[0]:loc[1]]
		if loc[0] > 0 && (e[loc[0]-1] >= '0' && e[loc[0]-1] <= '9' || e[loc[0]-1] == '.') {
			continue // part of a number such as 1e3
		}
		if rest := strings.TrimLeft(e[loc[1]:], " \t\n"); strings.HasPrefix(rest, "(") {
			continue // a function or aggregation
		}
		if promKeyword(name) {
			continue
		}
		metrics = append(metrics, name)
	}
	return metrics, labels
}

func TestPromNames(t *testing.T) {
	m, l := promNames(`histogram_quantile(0.95, sum by (instance, le) (rate(sse_time_to_first_event_seconds_bucket{instance=~"$instance", route!~"a|b"}[$__rate_interval]))) > 5
		and on (instance) up{job="voicegate"} == 0 or count(count by (version) (voicegate_build_info)) > 1e3`)
	if want := []string{"sse_time_to_first_event_seconds_bucket", "up", "voicegate_build_info"}; !slices.Equal(m, want) {
		t.Errorf("metrics = %q, want %q", m, want)
	}
	slices.Sort(l)
	if want := []string{"instance", "instance", "instance", "job", "le", "route", "version"}; !slices.Equal(l, want) {
		t.Errorf("labels = %q, want %q", l, want)
	}
}

// exportedSeries is what a gateway's /metrics offers to PromQL: series names (a histogram's
// _bucket, _sum and _count) with the labels each may carry, and the families they come from.
type exportedSeries struct {
	labels   map[string]map[string]bool // series name → label names
	families map[string]string          // series name → family name
}

// scrapeBusyGateway starts a gateway through run, with Redis and a fake algorithm service,
// sends it a chat stream, a voice session with audio and a request without a token, so that
// every metric has a series, and returns its /metrics parsed.
func scrapeBusyGateway(t *testing.T) exportedSeries {
	t.Helper()
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) { ndjson(w, happyLines...) }})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "REDIS_URL": startRedis(t).URL()})
	readEvents(t, wantStream(t, postChat(t, g, `{"message":"hi"}`, nil)))
	wantStatus(t, call(t, g, "GET", "/api/v2/voice/sessions", "", ""), http.StatusUnauthorized)
	v := dialVoice(t, g, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := v.conn.Write(ctx, websocket.MessageBinary, bytes.Repeat([]byte{1, 2}, 320)); err != nil {
		t.Fatal(err)
	}
	v.turn(t)
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	var fams map[string]*dto.MetricFamily
	eventually(t, 5*time.Second, "the voice session counted", func() bool {
		fams = scrape(t, g.URL+"/metrics")
		_, ok := sample(fams, "voice_sessions_total", nil)
		return ok
	})
	out := exportedSeries{labels: map[string]map[string]bool{}, families: map[string]string{}}
	for name, f := range fams {
		ls := map[string]bool{}
		for _, m := range f.GetMetric() {
			for l := range labelsOf(m) {
				ls[l] = true
			}
		}
		names := []string{name}
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM:
			ls["le"] = true
			names = []string{name + "_bucket", name + "_sum", name + "_count"}
		case dto.MetricType_SUMMARY:
			ls["quantile"] = true
			names = []string{name, name + "_sum", name + "_count"}
		}
		for _, n := range names {
			out.labels[n], out.families[n] = ls, name
		}
	}
	return out
}

// dashboardExprs returns the PromQL of every panel target of the Grafana dashboard, keyed by
// where it is, and the metrics its templating queries name.
func dashboardExprs(t *testing.T) (exprs map[string]string, templMetrics map[string]string) {
	t.Helper()
	var dash map[string]any
	if err := json.Unmarshal(readDeploy(t, "grafana/dashboards/voicegate.json"), &dash); err != nil {
		t.Fatalf("deploy/grafana/dashboards/voicegate.json: %v", err)
	}
	exprs, templMetrics = map[string]string{}, map[string]string{}
	var walk func(panels []any)
	walk = func(panels []any) {
		for _, p := range panels {
			title := str(dig(p, "title"))
			for i, tg := range dig(p, "targets").([]any) {
				exprs[fmt.Sprintf("panel %q target %d", title, i)] = str(dig(tg, "expr"))
			}
			if sub, ok := dig(p, "panels").([]any); ok {
				walk(sub)
			}
		}
	}
	for _, p := range dig(dash, "panels").([]any) {
		if str(dig(p, "type")) == "row" {
			sub, _ := dig(p, "panels").([]any)
			walk(sub)
			continue
		}
		if _, ok := dig(p, "targets").([]any); !ok {
			t.Errorf("dashboard panel %q has no targets", str(dig(p, "title")))
			continue
		}
		walk([]any{p})
	}
	labelValues := regexp.MustCompile(`label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)`)
	tmpl, _ := dig(dash, "templating", "list").([]any)
	for _, v := range tmpl {
		q := str(dig(v, "query", "query"))
		if q == "" {
			q = str(dig(v, "query"))
		}
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("dashboard variable %q: query %q is not label_values(metric, label)", str(dig(v, "name")), q)
			continue
		}
		templMetrics[m[1]] = m[2]
		if uid := str(dig(v, "datasource", "uid")); uid != "prometheus" {
			t.Errorf("dashboard variable %q uses datasource %q, want the provisioned uid prometheus", str(dig(v, "name")), uid)
		}
	}
	return exprs, templMetrics
}

// ruleFiles returns the rule files under deploy/prometheus (relative to deploy/): the YAML
// files with rule groups.
func ruleFiles(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, ext := range []string{"yml", "yaml"} {
		paths, err := filepath.Glob(filepath.Join("deploy", "prometheus", "*."+ext))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range paths {
			rel := strings.TrimPrefix(filepath.ToSlash(p), "deploy/")
			docs := yamlDocs(t, rel)
			if len(docs) > 0 && docs[0]["groups"] != nil {
				out = append(out, rel)
			}
		}
	}
	if len(out) == 0 {
		t.Fatal("deploy/prometheus has no rule files")
	}
	slices.Sort(out)
	return out
}

// ruleExprs returns every alert rule's expression, of every rule file, by alert name.
func ruleExprs(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, f := range ruleFiles(t) {
		n := len(out)
		for _, doc := range yamlDocs(t, f) {
			for _, g := range dig(doc, "groups").([]any) {
				for _, r := range dig(g, "rules").([]any) {
					name := "alert " + str(dig(r, "alert"))
					if _, dup := out[name]; dup {
						t.Errorf("deploy/%s: %s is defined twice", f, name)
					}
					out[name] = str(dig(r, "expr"))
				}
			}
		}
		if len(out) == n {
			t.Errorf("deploy/%s has no rules", f)
		}
	}
	return out
}

// collected reports whether a metric family comes from the Prometheus client's process and Go
// collectors rather than from the gateway's own instruments: dozens of go_memstats_* that the
// dashboard need not all show (those it or a rule names must still exist).
func collected(family string) bool {
	return strings.HasPrefix(family, "go_") || strings.HasPrefix(family, "process_")
}

// TestDeployMetricsMatchGateway: every metric the Grafana dashboard and the alert rules (of
// every rule file) query is one a gateway started through run, with Redis and an algorithm
// service, really exports (up aside, which Prometheus records for every target), with labels
// it really has; and the dashboard shows every metric of the gateway's own, and the process's
// CPU, memory, descriptors, goroutines and GC.
func TestDeployMetricsMatchGateway(t *testing.T) {
	exported := scrapeBusyGateway(t)
	dash, templ := dashboardExprs(t)
	rules := ruleExprs(t)
	// Labels Prometheus adds to every scraped series, and the histogram bucket bound.
	extra := map[string]bool{"instance": true, "job": true, "le": true}

	shown := map[string]bool{}
	check := func(where, expr string, allowUp bool) {
		metrics, labels := promNames(expr)
		if len(metrics) == 0 {
			t.Errorf("%s: no metric in %q", where, expr)
		}
		known := maps.Clone(extra)
		for _, m := range metrics {
			if m == "up" && allowUp {
				continue
			}
			ls, ok := exported.labels[m]
			if !ok {
				t.Errorf("%s: metric %s is not exported by the gateway (exports %v)", where, m, slices.Sorted(maps.Keys(exported.labels)))
				continue
			}
			shown[exported.families[m]] = true
			maps.Copy(known, ls)
		}
		for _, l := range labels {
			if !known[l] {
				t.Errorf("%s: label %q is on none of the metrics %v", where, l, metrics)
			}
		}
	}
	for where, e := range dash {
		check(where, e, false)
	}
	for m, l := range templ {
		if ls, ok := exported.labels[m]; !ok || !(ls[l] || extra[l]) {
			t.Errorf("dashboard variable: label_values(%s, %s) names a metric or label the gateway does not export", m, l)
		}
	}
	for family := range maps.Values(exported.families) {
		if !shown[family] && (!collected(family) || slices.Contains(processMetrics, family)) {
			t.Errorf("the dashboard shows no panel for %s", family)
		}
	}
	for where, e := range rules {
		check(where, e, true)
	}
	// The leak and saturation rules read the process's own figures.
	for _, m := range []string{"process_open_fds", "process_max_fds", "go_goroutines", "process_resident_memory_bytes",
		"upstream_request_duration_seconds_bucket", "redis_command_duration_seconds_bucket"} {
		if !slices.ContainsFunc(slices.Collect(maps.Values(rules)), func(e string) bool { return strings.Contains(e, m) }) {
			t.Errorf("no alert rule reads %s", m)
		}
	}

	// The dashboard reads the datasource the provisioning file creates.
	ds := yamlDocs(t, "grafana/provisioning/datasources/prometheus.yml")
	if uid := str(dig(ds[0], "datasources", 0, "uid")); uid != "prometheus" {
		t.Errorf("provisioned datasource uid = %q, want prometheus (the dashboard's)", uid)
	}
	raw := string(readDeploy(t, "grafana/dashboards/voicegate.json"))
	for _, m := range regexp.MustCompile(`"uid":\s*"([^"]*)"`).FindAllStringSubmatch(raw, -1) {
		if m[1] != "prometheus" && m[1] != "voicegate" {
			t.Errorf("dashboard names uid %q, neither the datasource nor the dashboard itself", m[1])
		}
	}
}

// TestDeployPromtool: every rule file passes promtool check rules, the rules pass their unit
// tests (alerts_test.yml), and the compose topology's Prometheus configuration passes promtool
// check config (which loads the rule files it names).
func TestDeployPromtool(t *testing.T) {
	t.Parallel()
	promtool := requireTool(t, "promtool", "/usr/bin/promtool", "prometheus")
	dir := filepath.Join("deploy", "prometheus")
	for _, f := range ruleFiles(t) {
		runTool(t, promtool, "check", "rules", filepath.Join("deploy", f))
	}
	runTool(t, promtool, "test", "rules", filepath.Join(dir, "alerts_test.yml"))
	runTool(t, promtool, "check", "config", filepath.Join(dir, "prometheus.yml"))
}

// TestDeployRuleFilesLoaded: Prometheus loads every rule file (a rule_files glob of
// prometheus.yml covers each, and every glob matches one), the unit tests load every one too,
// and every alert has a test in which it fires. A rule file left out of either would never
// fire, or never be tested, and no check of the file alone would say so.
func TestDeployRuleFilesLoaded(t *testing.T) {
	files := ruleFiles(t)
	covered := func(what string, globs []string) {
		t.Helper()
		for _, g := range globs {
			if !slices.ContainsFunc(files, func(f string) bool { ok, _ := path.Match("prometheus/"+g, f); return ok }) {
				t.Errorf("%s: rule_files entry %q matches no rule file (%v)", what, g, files)
			}
		}
		for _, f := range files {
			if !slices.ContainsFunc(globs, func(g string) bool { ok, _ := path.Match("prometheus/"+g, f); return ok }) {
				t.Errorf("%s: no rule_files entry loads deploy/%s (entries %q)", what, f, globs)
			}
		}
	}
	covered("prometheus.yml", strList(dig(yamlDocs(t, "prometheus/prometheus.yml")[0], "rule_files")))
	tests := yamlDocs(t, "prometheus/alerts_test.yml")[0]
	covered("alerts_test.yml", strList(dig(tests, "rule_files")))

	tested := map[string]bool{}
	for _, tc := range dig(tests, "tests").([]any) {
		for _, a := range dig(tc, "alert_rule_test").([]any) {
			if l, _ := dig(a, "exp_alerts").([]any); len(l) > 0 {
				tested["alert "+str(dig(a, "alertname"))] = true
			}
		}
	}
	for name := range ruleExprs(t) {
		if !tested[name] {
			t.Errorf("%s has no test in alerts_test.yml where it fires", name)
		}
	}
}

// TestDeployAlertmanager: the compose topology's Alertmanager configuration passes amtool
// check-config (Debian's prometheus-alertmanager package), Prometheus sends its alerts to the
// compose service that runs it, which mounts that file where its --config.file says, and the
// alerts its routes and inhibitions name exist in the rule files.
func TestDeployAlertmanager(t *testing.T) {
	const config = "alertmanager/alertmanager.yml"
	am := composeServices(t)["alertmanager"]
	if am == nil {
		t.Fatal("compose.yaml has no alertmanager service")
	}
	var file string
	for _, a := range strList(am["command"]) {
		if v, ok := strings.CutPrefix(a, "--config.file="); ok {
			file = v
		}
	}
	mounted := false
	for _, m := range strList(am["volumes"]) {
		src, dst, _ := strings.Cut(m, ":")
		dst, _, _ = strings.Cut(dst, ":")
		if rel, ok := strings.CutPrefix(file, dst+"/"); ok && path.Join(strings.TrimPrefix(src, "./"), rel) == config {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("alertmanager runs --config.file=%q, which none of its volumes %q mounts from deploy/%s", file, strList(am["volumes"]), config)
	}
	var targets []string
	for _, c := range dig(yamlDocs(t, "prometheus/prometheus.yml")[0], "alerting", "alertmanagers").([]any) {
		for _, sc := range dig(c, "static_configs").([]any) {
			targets = append(targets, strList(dig(sc, "targets"))...)
		}
	}
	port := "9093" // Alertmanager's default --web.listen-address
	if ports := strList(am["ports"]); len(ports) == 1 {
		port = ports[0][strings.LastIndex(ports[0], ":")+1:]
	}
	if !slices.Equal(targets, []string{"alertmanager:" + port}) {
		t.Errorf("prometheus.yml sends alerts to %q, want the alertmanager service on %s", targets, port)
	}

	rules := ruleExprs(t)
	named := regexp.MustCompile(`alertname\s*=\s*"([^"]+)"`)
	for _, m := range named.FindAllStringSubmatch(string(readDeploy(t, config)), -1) {
		if _, ok := rules["alert "+m[1]]; !ok {
			t.Errorf("deploy/%s names alert %s, which no rule file defines", config, m[1])
		}
	}

	amtool := requireTool(t, "amtool", "/usr/bin/amtool", "prometheus-alertmanager")
	runTool(t, amtool, "check-config", filepath.Join("deploy", config))
}

const nginxTemplate = "nginx/voicegate.conf.template"

var templateVar = regexp.MustCompile(`\$\{([A-Z0-9_]+)\}`)

// templateVars returns the ${VAR}s of the nginx template.
func templateVars(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, m := range templateVar.FindAllStringSubmatch(string(readDeploy(t, nginxTemplate)), -1) {
		if !slices.Contains(out, m[1]) {
			out = append(out, m[1])
		}
	}
	slices.Sort(out)
	return out
}

// renderNginx renders the template as the nginx image's envsubst step does.
func renderNginx(t *testing.T, vars map[string]string) string {
	t.Helper()
	out := templateVar.ReplaceAllStringFunc(string(readDeploy(t, nginxTemplate)), func(m string) string {
		name := templateVar.FindStringSubmatch(m)[1]
		v, ok := vars[name]
		if !ok {
			t.Fatalf("no value for ${%s} of the nginx template", name)
		}
		return v
	})
	return out
}

// nginxDirectives returns the arguments of every occurrence of a directive in a configuration.
func nginxDirectives(conf, name string) []string {
	var out []string
	re := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(name) + `\s+([^;]*);`)
	for _, m := range re.FindAllStringSubmatch(conf, -1) {
		out = append(out, strings.TrimSpace(m[1]))
	}
	return out
}

// testNginx is an nginx child process with the rendered template, on loopback.
type testNginx struct {
	Addr   string // 127.0.0.5:port
	prefix string
	cmd    *exec.Cmd
	done   chan struct{}
}

// nginxHost is the loopback address the test nginx listens on, and clientHost the one its
// clients come from; no other test server binds them.
const (
	nginxHost  = "127.0.0.5"
	clientHost = "127.0.0.6"
)

// writeNginxConf writes the main configuration around the rendered template into prefix, with
// the pid, logs and temporary files there too (nginx's compiled-in paths are not writable by a
// test).
func writeNginxConf(t *testing.T, prefix string, vars map[string]string) string {
	t.Helper()
	for _, d := range []string{"logs", "tmp"} {
		if err := os.MkdirAll(filepath.Join(prefix, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(prefix, "voicegate.conf"), []byte(renderNginx(t, vars)), 0o644); err != nil {
		t.Fatal(err)
	}
	user := ""
	if os.Geteuid() == 0 {
		user = "user root root;\n" // workers would switch to nobody, who cannot enter the test's temp dir
	}
	main := fmt.Sprintf(`%sdaemon off;
worker_processes 1;
pid %[2]s/nginx.pid;
error_log %[2]s/logs/error.log info;
events { worker_connections 256; }
http {
    access_log %[2]s/logs/access.log;
    client_body_temp_path %[2]s/tmp/client_body;
    proxy_temp_path %[2]s/tmp/proxy;
    fastcgi_temp_path %[2]s/tmp/fastcgi;
    uwsgi_temp_path %[2]s/tmp/uwsgi;
    scgi_temp_path %[2]s/tmp/scgi;
    include %[2]s/voicegate.conf;
}
`, user, prefix)
	conf := filepath.Join(prefix, "nginx.conf")
	if err := os.WriteFile(conf, []byte(main), 0o644); err != nil {
		t.Fatal(err)
	}
	return conf
}

// startNginx runs nginx in front of upstreams (host:port), on a free port of nginxHost, until
// the test ends.
func startNginx(t *testing.T, upstreams ...string) *testNginx {
	t.Helper()
	bin := requireTool(t, "nginx", "/usr/sbin/nginx", "nginx")
	var errs []string
	for range 5 { // the free port may be taken before nginx binds it: try a few
		ln, err := net.Listen("tcp", nginxHost+":0")
		if err != nil {
			t.Fatal(err)
		}
		port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
		ln.Close()
		prefix := t.TempDir()
		conf := writeNginxConf(t, prefix, map[string]string{
			"NGINX_LISTEN_PORT": nginxHost + ":" + port, "VOICEGATE_1": upstreams[0], "VOICEGATE_2": upstreams[1]})
		n := &testNginx{Addr: nginxHost + ":" + port, prefix: prefix, done: make(chan struct{})}
		out := &logBuffer{}
		n.cmd = exec.Command(bin, "-p", prefix, "-c", conf, "-e", "stderr")
		n.cmd.Stdout, n.cmd.Stderr = out, out
		if err := n.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() {
			_ = n.cmd.Wait()
			close(n.done)
		}()
		t.Cleanup(n.stop)
		if n.accepting() {
			return n
		}
		n.stop()
		errs = append(errs, out.String())
	}
	t.Fatalf("nginx did not start:\n%s", strings.Join(errs, "\n"))
	return nil
}

// accepting waits until nginx accepts connections, or has exited.
func (n *testNginx) accepting() bool {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-n.done:
			return false
		default:
		}
		if c, err := net.DialTimeout("tcp", n.Addr, 100*time.Millisecond); err == nil {
			c.Close()
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// stop ends nginx (fast shutdown) and waits for it.
func (n *testNginx) stop() {
	select {
	case <-n.done:
		return
	default:
	}
	_ = n.cmd.Process.Signal(os.Interrupt)
	select {
	case <-n.done:
	case <-time.After(5 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.done
	}
}

// TestDeployNginxConfig: the template renders with exactly the variables compose sets, passes
// nginx -t, and has the streaming settings the README recommends: no buffering, WebSocket
// upgrade headers, and idle timeouts above the gateway's ping intervals.
func TestDeployNginxConfig(t *testing.T) {
	conf := renderNginx(t, map[string]string{"NGINX_LISTEN_PORT": nginxHost + ":8080",
		"VOICEGATE_1": "127.0.0.1:8081", "VOICEGATE_2": "127.0.0.1:8082"})
	for directive, want := range map[string]string{
		"proxy_buffering":         "off",
		"proxy_request_buffering": "off",
		"proxy_cache":             "off",
		"gzip":                    "off",
		"proxy_http_version":      "1.1",
	} {
		if got := nginxDirectives(conf, directive); !slices.Equal(got, []string{want}) {
			t.Errorf("%s = %q, want %q", directive, got, want)
		}
	}
	headers := nginxDirectives(conf, "proxy_set_header")
	for _, want := range []string{"Upgrade $http_upgrade", "Connection $connection_upgrade", "Host $http_host",
		"X-Forwarded-For $proxy_add_x_forwarded_for"} {
		if !slices.Contains(headers, want) {
			t.Errorf("no proxy_set_header %s (have %q)", want, headers)
		}
	}
	defaults, err := parseConfig([]string{"voicegate"}, envFunc(map[string]string{"ALGO_URL": "http://a"}), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, directive := range []string{"proxy_read_timeout", "proxy_send_timeout"} {
		got := nginxDirectives(conf, directive)
		if len(got) != 1 {
			t.Fatalf("%s = %q, want one", directive, got)
		}
		d, err := time.ParseDuration(got[0])
		if err != nil {
			t.Fatalf("%s %s: %v", directive, got[0], err)
		}
		// A voice peer is dead only after two ping intervals; a chat stream pings every interval.
		if d <= 2*defaults.VoicePing || d <= defaults.SSEPingInterval {
			t.Errorf("%s %v is not above the ping intervals (SSE %v, voice 2×%v)", directive, d, defaults.SSEPingInterval, defaults.VoicePing)
		}
	}

	nginx := requireTool(t, "nginx", "/usr/sbin/nginx", "nginx")
	prefix := t.TempDir()
	main := writeNginxConf(t, prefix, map[string]string{"NGINX_LISTEN_PORT": nginxHost + ":8080",
		"VOICEGATE_1": "127.0.0.1:8081", "VOICEGATE_2": "127.0.0.1:8082"})
	out := runTool(t, nginx, "-t", "-p", prefix, "-c", main, "-e", "stderr")
	if !strings.Contains(out, "test is successful") {
		t.Errorf("nginx -t:\n%s", out)
	}
}

// composeGatewayEnv returns the environment compose gives voicegate-1, with ${VAR:-default}
// interpolated as compose does when VAR is unset.
func composeGatewayEnv(t *testing.T) map[string]string {
	t.Helper()
	return composeEnv(t, composeServices(t)["voicegate-1"])
}

// TestDeployNginxChatAndVoice runs the compose topology's nginx, from its template, in front of
// two gateways started through run with compose's gateway settings (only addresses, the secret
// and the shutdown times changed for the test). Chat events arrive through nginx one by one,
// while the algorithm service still holds the rest of the answer; requests reach both
// gateways; the client address nginx adds is believed; a voice session, from a browser page on
// nginx's own origin, runs through.
func TestDeployNginxChatAndVoice(t *testing.T) {
	t.Parallel()
	requireTool(t, "nginx", "/usr/sbin/nginx", "nginx")
	gate := make(chan struct{})
	algo := newAlgo(t, algoOptions{Voice: newDemoVoices().ServeHTTP, Query: func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		rc := http.NewResponseController(w)
		for _, l := range []string{`{"type":"generation_start"}`, `{"type":"generation_chunk","content":"Hel"}`, `{"type":"generation_chunk","content":"lo"}`} {
			_, _ = fmt.Fprintln(w, l)
			_ = rc.Flush()
			select { // the next line only once the client has this one
			case <-gate:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = fmt.Fprintln(w, `{"type":"generation_done"}`)
	}})

	env := composeGatewayEnv(t)
	env["ALGO_URL"] = algo.URL
	env["LISTEN_ADDR"] = "127.0.0.1:0"
	env["METRICS_ADDR"] = "127.0.0.1:0"
	env["JWT_SECRET"] = testSecret
	// nginx's address as the gateways see it (its network's in compose).
	env["TRUSTED_PROXIES"] = "127.0.0.1/32"
	env["SHUTDOWN_GRACE"], env["DRAIN_DELAY"] = "2s", "0s"
	env["POLICY_FILE"] = "" // the built-in policy, as in compose
	env["LOG_LEVEL"] = "debug"
	if _, err := exec.LookPath("redis-server"); err == nil || os.Getenv("VOICEGATE_REQUIRE_REDIS") == "1" {
		env["REDIS_URL"] = startRedis(t).URL()
	} else {
		t.Log("redis-server not installed: the gateways run without REDIS_URL")
		delete(env, "REDIS_URL")
	}
	g1 := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "voicegate-1"}))
	g2 := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "voicegate-2"}))
	nginx := startNginx(t, g1.Addr, g2.Addr)
	// The client comes from an address of its own, so the gateways' client_ip shows that what
	// nginx saw got through, and what the client claimed in X-Forwarded-For did not.
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(clientHost)}}
	client := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	defer client.CloseIdleConnections()
	token := tokenFor(t, "u-nginx", []string{"user"}, nil)

	const chats = 4
	for i := range chats {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+nginx.Addr+"/api/v2/chat/stream",
			strings.NewReader(`{"message":"hi"}`))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Forwarded-For", "203.0.113.7")
		res, err := client.Do(req)
		if err != nil {
			t.Fatalf("chat %d through nginx: %v", i, err)
		}
		s := wantStream(t, res)
		var names []string
		for _, want := range []string{"stream_start", "generation_start", "generation_chunk", "generation_chunk"} {
			ev := nextEvent(t, s) // would block forever if nginx held the stream back
			names = append(names, ev.Event)
			if ev.Event != want {
				t.Fatalf("chat %d: events %v, want %s next", i, names, want)
			}
			if ev.Event != "stream_start" {
				gate <- struct{}{}
			}
		}
		rest := readEvents(t, s)
		if n := len(rest); n != 2 || rest[0].Event != "generation_done" || rest[1].Event != "stream_end" {
			t.Errorf("chat %d: events after the chunks = %v, want generation_done stream_end", i, eventNames(rest))
		}
		res.Body.Close()
		cancel()
	}
	served := func(g *testGateway) (n int, clientIPs []string) {
		for _, rec := range logRecords(t, g) {
			if rec["msg"] == "request" && rec["route"] == "POST /api/v2/chat/stream" {
				n++
				clientIPs = append(clientIPs, str(rec["client_ip"]))
			}
		}
		return n, clientIPs
	}
	eventually(t, 2*time.Second, "every chat request logged", func() bool {
		n1, _ := served(g1)
		n2, _ := served(g2)
		return n1+n2 == chats
	})
	n1, ips1 := served(g1)
	n2, ips2 := served(g2)
	if n1 == 0 || n2 == 0 {
		t.Errorf("chat requests per gateway = %d, %d; want both to serve some", n1, n2)
	}
	for _, ip := range append(ips1, ips2...) {
		if ip != clientHost {
			t.Errorf("a gateway logged client_ip %q, want %s, the address nginx saw (not the forged X-Forwarded-For)", ip, clientHost)
		}
	}

	// Voice, as a browser on nginx's origin would open it: the token as a subprotocol.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	conn, res, err := websocket.Dial(ctx, "ws://"+nginx.Addr+"/api/v2/voice/stream?conversation_id=c-1", &websocket.DialOptions{
		HTTPClient:   client,
		HTTPHeader:   http.Header{"Origin": {"http://" + nginx.Addr}},
		Subprotocols: []string{"voice-protocol-v2", "bearer." + token},
	})
	if err != nil {
		status := 0
		if res != nil {
			status = res.StatusCode
		}
		t.Fatalf("voice through nginx: %v (status %d)", err, status)
	}
	defer conn.CloseNow()
	if p := conn.Subprotocol(); p != "voice-protocol-v2" {
		t.Errorf("subprotocol through nginx = %q, want voice-protocol-v2", p)
	}
	var types []string
	audio := 0
	for !slices.Contains(types, "tts_complete") {
		typ, msg, err := conn.Read(ctx)
		if err != nil {
			t.Fatalf("voice through nginx, after %v: %v", types, err)
		}
		if typ == websocket.MessageBinary {
			audio++
			continue
		}
		var m map[string]any
		_ = json.Unmarshal(msg, &m)
		types = append(types, str(m["type"]))
		if m["type"] == "session_initialized" {
			if err := conn.Write(ctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if types[0] != "session_initialized" || !slices.Contains(types, "asr_final") || !slices.Contains(types, "llm_response_chunk") || audio == 0 {
		t.Errorf("voice messages = %v with %d audio frames, want session_initialized, asr_final, llm_response_chunk…, audio, tts_complete", types, audio)
	}
	if err := conn.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Errorf("closing the voice session through nginx: %v", err)
	}
}

func composeServices(t *testing.T) map[string]map[string]any {
	t.Helper()
	docs := yamlDocs(t, "compose.yaml")
	if len(docs) != 1 {
		t.Fatalf("deploy/compose.yaml has %d documents, want 1", len(docs))
	}
	out := map[string]map[string]any{}
	svcs, _ := docs[0]["services"].(map[string]any)
	for name, s := range svcs {
		m, ok := s.(map[string]any)
		if !ok {
			t.Fatalf("compose service %s is not a mapping", name)
		}
		out[name] = m
	}
	return out
}

var composeVar = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}`)

// composeEnv returns a service's environment, interpolated as compose does with the variables
// unset: ${VAR:-default} becomes default.
func composeEnv(t *testing.T, svc map[string]any) map[string]string {
	t.Helper()
	out := map[string]string{}
	env, _ := svc["environment"].(map[string]any)
	for k, v := range env {
		s := composeVar.ReplaceAllStringFunc(str(v), func(m string) string { return composeVar.FindStringSubmatch(m)[2] })
		out[k] = s
	}
	return out
}

// TestDeployCompose: compose.yaml parses; the gateways' variables are all settings the gateway
// knows and form a valid configuration; every address names a service of the file on the port
// that service listens on; the stop timeout is above SHUTDOWN_GRACE; the files it mounts exist.
func TestDeployCompose(t *testing.T) {
	svcs := composeServices(t)
	want := []string{"alertmanager", "demo-algo", "grafana", "nginx", "prometheus", "redis", "voicegate-1", "voicegate-2"}
	if got := slices.Sorted(maps.Keys(svcs)); !slices.Equal(got, want) {
		t.Fatalf("compose services = %v, want %v", got, want)
	}
	known := settingNames()
	dockerfile, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	algo := composeEnv(t, svcs["demo-algo"])
	gatewayPorts := map[string]string{} // service → LISTEN_ADDR port
	metricsPorts := map[string]string{} // service → METRICS_ADDR port

	for _, name := range []string{"voicegate-1", "voicegate-2"} {
		t.Run(name, func(t *testing.T) {
			svc := svcs[name]
			env := composeEnv(t, svc)
			for k := range env {
				if !known[k] {
					t.Errorf("%s sets %s, which is not a setting of the gateway", name, k)
				}
			}
			cfg, err := parseConfig([]string{"voicegate"}, func(k string) string { return env[k] }, io.Discard)
			if err != nil {
				t.Fatalf("%s's environment is not a valid configuration: %v", name, err)
			}
			if got := str(dig(svc, "image")); got != "localhost/voicegate:local" || dig(svc, "build", "context") != ".." {
				t.Errorf("%s: image %q built from %v, want localhost/voicegate:local from the repository root", name, got, dig(svc, "build", "context"))
			}
			if env["INSTANCE_NAME"] != name {
				t.Errorf("%s: INSTANCE_NAME = %q, want the service name", name, env["INSTANCE_NAME"])
			}
			stop, err := time.ParseDuration(str(svc["stop_grace_period"]))
			if err != nil || stop <= cfg.ShutdownGrace {
				t.Errorf("%s: stop_grace_period %v, want above SHUTDOWN_GRACE %v", name, svc["stop_grace_period"], cfg.ShutdownGrace)
			}
			if hc := strList(dig(svc, "healthcheck", "test")); !slices.Equal(hc, []string{"CMD", "/voicegate", "-healthcheck"}) ||
				!strings.Contains(string(dockerfile), "\nENV LISTEN_ADDR_FILE=") || !known["LISTEN_ADDR_FILE"] {
				t.Errorf("%s: healthcheck %q, want /voicegate -healthcheck with the image's LISTEN_ADDR_FILE", name, hc)
			}
			if u := cfg.AlgoURLs[0]; u.Hostname() != "demo-algo" || u.Port() != portOf(t, algo["LISTEN_ADDR"]) {
				t.Errorf("%s: ALGO_URL %s, want demo-algo on its LISTEN_ADDR %s", name, u, algo["LISTEN_ADDR"])
			}
			if len(cfg.RedisAddrs) != 1 || cfg.RedisAddrs[0] != "redis:6379" {
				t.Errorf("%s: REDIS_URL names %v, want the redis service on 6379", name, cfg.RedisAddrs)
			}
			subnet := str(dig(yamlDocs(t, "compose.yaml")[0], "networks", "edge", "ipam", "config", 0, "subnet"))
			if p, err := netip.ParsePrefix(subnet); err != nil || !slices.Contains(cfg.TrustedProxies, p) {
				t.Errorf("%s: TRUSTED_PROXIES %v does not hold the edge network %q, where nginx runs", name, cfg.TrustedProxies, subnet)
			}
			for _, dep := range []string{"redis", "demo-algo"} {
				if str(dig(svc, "depends_on", dep, "condition")) != "service_healthy" {
					t.Errorf("%s: does not wait for %s to be healthy", name, dep)
				}
			}
			gatewayPorts[name] = portOf(t, cfg.ListenAddr)
			metricsPorts[name] = portOf(t, cfg.MetricsAddr)
		})
	}

	t.Run("demo-algo", func(t *testing.T) {
		svc := svcs["demo-algo"]
		if got := strList(svc["command"]); !slices.Equal(got, []string{"demo-algo"}) {
			t.Errorf("command = %q, want the demo-algo subcommand", got)
		}
		for k := range algo {
			if !slices.Contains([]string{"LISTEN_ADDR", "LOG_FORMAT", "LOG_LEVEL"}, k) {
				t.Errorf("demo-algo sets %s, which it does not read", k)
			}
		}
		hc := strList(dig(svc, "healthcheck", "test"))
		if !slices.Equal(hc, []string{"CMD", "/voicegate", "-healthcheck", "-listen-addr", algo["LISTEN_ADDR"]}) {
			t.Errorf("healthcheck %q, want -healthcheck on its LISTEN_ADDR %s", hc, algo["LISTEN_ADDR"])
		}
	})

	t.Run("redis", func(t *testing.T) {
		if cmd := strList(svcs["redis"]["command"]); slices.Contains(cmd, "--port") {
			t.Errorf("redis command %q moves the port off 6379, which REDIS_URL names", cmd)
		}
	})

	t.Run("nginx", func(t *testing.T) {
		svc := svcs["nginx"]
		env := composeEnv(t, svc)
		if got, want := slices.Sorted(maps.Keys(env)), templateVars(t); !slices.Equal(got, want) {
			t.Errorf("nginx environment %v, want exactly the template's variables %v", got, want)
		}
		for _, n := range []string{"1", "2"} {
			if got, want := env["VOICEGATE_"+n], "voicegate-"+n+":"+gatewayPorts["voicegate-"+n]; got != want {
				t.Errorf("VOICEGATE_%s = %q, want %q (the gateway's LISTEN_ADDR)", n, got, want)
			}
		}
		ports := strList(svc["ports"])
		if len(ports) != 1 || !strings.HasSuffix(ports[0], ":"+env["NGINX_LISTEN_PORT"]) {
			t.Errorf("nginx ports %q, want one published from NGINX_LISTEN_PORT %s", ports, env["NGINX_LISTEN_PORT"])
		}
		mounts := strList(svc["volumes"])
		if !slices.ContainsFunc(mounts, func(m string) bool {
			return strings.HasPrefix(m, "./"+nginxTemplate+":/etc/nginx/templates/") && strings.Contains(m, ".template:")
		}) {
			t.Errorf("nginx volumes %q do not mount %s as an image template", mounts, nginxTemplate)
		}
	})

	t.Run("prometheus", func(t *testing.T) {
		prom := yamlDocs(t, "prometheus/prometheus.yml")[0]
		var targets []string
		for _, sc := range dig(prom, "scrape_configs").([]any) {
			for _, st := range dig(sc, "static_configs").([]any) {
				targets = append(targets, strList(dig(st, "targets"))...)
			}
		}
		var want []string
		for _, name := range []string{"voicegate-1", "voicegate-2"} {
			want = append(want, name+":"+metricsPorts[name])
		}
		if !slices.Equal(targets, want) {
			t.Errorf("Prometheus scrapes %q, want the gateways' METRICS_ADDR %q", targets, want)
		}
		for _, f := range strList(dig(prom, "rule_files")) {
			if m, err := filepath.Glob(filepath.Join("deploy", "prometheus", f)); err != nil || len(m) == 0 {
				t.Errorf("rule files %s: none (%v)", f, err)
			}
		}
		ports := strList(svcs["prometheus"]["ports"])
		if url := str(dig(yamlDocs(t, "grafana/provisioning/datasources/prometheus.yml")[0], "datasources", 0, "url")); len(ports) != 1 ||
			url != "http://prometheus:"+ports[0][strings.LastIndex(ports[0], ":")+1:] {
			t.Errorf("Grafana's datasource %q does not match Prometheus's port %q", url, ports)
		}
	})

	t.Run("grafana", func(t *testing.T) {
		svc := svcs["grafana"]
		env := composeEnv(t, svc)
		provider := yamlDocs(t, "grafana/provisioning/dashboards/voicegate.yml")[0]
		dashDir := str(dig(provider, "providers", 0, "options", "path"))
		if !slices.Contains(strList(svc["volumes"]), "./grafana/dashboards:"+dashDir+":ro") {
			t.Errorf("grafana volumes %q do not mount the dashboards at the provider's path %s", strList(svc["volumes"]), dashDir)
		}
		home := env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
		if rel, ok := strings.CutPrefix(home, dashDir+"/"); !ok {
			t.Errorf("home dashboard %q is not under %s", home, dashDir)
		} else if _, err := os.Stat(filepath.Join("deploy", "grafana", "dashboards", rel)); err != nil {
			t.Errorf("home dashboard: %v", err)
		}
	})

	t.Run("mounts and dependencies", func(t *testing.T) {
		for name, svc := range svcs {
			for _, m := range strList(svc["volumes"]) {
				src, _, _ := strings.Cut(m, ":")
				if _, err := os.Stat(filepath.Join("deploy", src)); err != nil {
					t.Errorf("%s mounts %s: %v", name, src, err)
				}
			}
			deps := svc["depends_on"]
			if l, ok := deps.([]any); ok {
				for _, d := range l {
					if svcs[str(d)] == nil {
						t.Errorf("%s depends on %v, which is not a service", name, d)
					}
				}
			}
			if m, ok := deps.(map[string]any); ok {
				for d := range m {
					if svcs[d] == nil {
						t.Errorf("%s depends on %v, which is not a service", name, d)
					}
				}
			}
		}
	})
}

// qualifiedImage reports whether an image reference names its registry: podman (and Docker
// with short-name resolution off) refuses a short name such as golang:1.26 rather than guess
// which registry is meant. The first part of the name must be a host (it has a dot or a port,
// or is localhost), and a tag or digest must follow the name.
func qualifiedImage(ref string) bool {
	host, rest, ok := strings.Cut(ref, "/")
	if !ok || !(strings.ContainsAny(host, ".:") || host == "localhost") || rest == "" {
		return false
	}
	last := rest[strings.LastIndex(rest, "/")+1:]
	return strings.Contains(last, ":") || strings.Contains(last, "@")
}

func TestQualifiedImage(t *testing.T) {
	for ref, want := range map[string]bool{
		"docker.io/library/golang:1.26":              true,
		"gcr.io/distroless/static-debian12:nonroot":  true,
		"localhost/voicegate:local":                  true,
		"registry.example:5000/team/app@sha256:abcd": true,
		"golang:1.26":              false,
		"prom/prometheus:v2.53.1":  false,
		"docker.io/library/golang": false,
		"voicegate:local":          false,
	} {
		if got := qualifiedImage(ref); got != want {
			t.Errorf("qualifiedImage(%q) = %v, want %v", ref, got, want)
		}
	}
}

// TestDeployImagesFullyQualified: every image the Dockerfile, the compose file and the
// Kubernetes example name is fully qualified (registry, name, tag), so podman pulls what Docker
// pulls and nothing depends on a registry search list.
func TestDeployImagesFullyQualified(t *testing.T) {
	images := map[string]string{} // image → where
	raw, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	stages := map[string]bool{}
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || !strings.EqualFold(f[0], "FROM") {
			continue
		}
		args := slices.DeleteFunc(f[1:], func(a string) bool { return strings.HasPrefix(a, "--") }) // --platform=...
		if !stages[args[0]] {
			images[args[0]] = "Dockerfile"
		}
		if len(args) == 3 && strings.EqualFold(args[1], "AS") {
			stages[args[2]] = true
		}
	}
	for name, svc := range composeServices(t) {
		images[str(svc["image"])] = "compose service " + name
	}
	var walk func(where string, v any)
	walk = func(where string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				if k == "image" {
					images[str(e)] = where
				}
				walk(where, e)
			}
		case []any:
			for _, e := range v {
				walk(where, e)
			}
		}
	}
	for _, d := range yamlDocs(t, "kubernetes/voicegate.yaml") {
		walk("kubernetes "+str(d["kind"]), d)
	}
	if len(images) < 3 {
		t.Fatalf("found only %v", images)
	}
	for img, where := range images {
		if !qualifiedImage(img) {
			hint := "docker.io/library/" + img // Docker Hub's official images
			if strings.Contains(img, "/") {
				hint = "docker.io/" + img
			}
			t.Errorf("%s: image %q is not fully qualified (want registry/name:tag, such as %s)", where, img, hint)
		}
	}
}

// TestDeployKubernetes: the example parses into a Deployment, a Service and a
// PodDisruptionBudget that select the same pods; the container's variables are settings the
// gateway knows and a valid configuration; the probes hit /readyz and /healthz on the
// container's port; terminationGracePeriodSeconds is above the preStop sleep plus
// SHUTDOWN_GRACE; the preStop sleep is at least DRAIN_DELAY and the readiness probe notices a
// drain within it.
func TestDeployKubernetes(t *testing.T) {
	byKind := map[string]map[string]any{}
	for _, d := range yamlDocs(t, "kubernetes/voicegate.yaml") {
		kind := str(d["kind"])
		if byKind[kind] != nil {
			t.Fatalf("two %s documents", kind)
		}
		byKind[kind] = d
	}
	if got := slices.Sorted(maps.Keys(byKind)); !slices.Equal(got, []string{"Deployment", "PodDisruptionBudget", "Service"}) {
		t.Fatalf("kinds = %v", got)
	}
	dep, svc, pdb := byKind["Deployment"], byKind["Service"], byKind["PodDisruptionBudget"]
	labels := dig(dep, "spec", "template", "metadata", "labels").(map[string]any)
	matches := func(sel any) bool {
		m, ok := sel.(map[string]any)
		if !ok || len(m) == 0 {
			return false
		}
		for k, v := range m {
			if labels[k] != v {
				return false
			}
		}
		return true
	}
	for what, sel := range map[string]any{
		"Deployment selector": dig(dep, "spec", "selector", "matchLabels"),
		"Service selector":    dig(svc, "spec", "selector"),
		"PDB selector":        dig(pdb, "spec", "selector", "matchLabels"),
	} {
		if !matches(sel) {
			t.Errorf("%s %v does not select the pods %v", what, sel, labels)
		}
	}
	replicas, _ := dig(dep, "spec", "replicas").(int)
	if minAvail, ok := dig(pdb, "spec", "minAvailable").(int); !ok || minAvail >= replicas || replicas < 2 {
		t.Errorf("PDB minAvailable %v with %d replicas: want some disruption allowed and one pod kept", dig(pdb, "spec", "minAvailable"), replicas)
	}

	c := dig(dep, "spec", "template", "spec", "containers", 0)
	known := settingNames()
	env := map[string]string{}
	for _, e := range dig(c, "env").([]any) {
		name := str(dig(e, "name"))
		if !known[name] {
			t.Errorf("the container sets %s, which is not a setting of the gateway", name)
		}
		if dig(e, "valueFrom") != nil {
			env[name] = "from-" + strings.ToLower(name) // a fieldRef or secret; any valid text
			continue
		}
		env[name] = str(dig(e, "value"))
	}
	cfg, err := parseConfig([]string{"voicegate"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatalf("the container's environment is not a valid configuration: %v", err)
	}

	ports := map[string]string{} // name → container port
	for _, p := range dig(c, "ports").([]any) {
		ports[str(dig(p, "name"))] = str(dig(p, "containerPort"))
	}
	if ports["http"] != portOf(t, cfg.ListenAddr) || ports["metrics"] != portOf(t, cfg.MetricsAddr) {
		t.Errorf("container ports %v, want http on LISTEN_ADDR %s and metrics on METRICS_ADDR %s", ports, cfg.ListenAddr, cfg.MetricsAddr)
	}
	if got := str(dig(dep, "spec", "template", "metadata", "annotations", "prometheus.io/port")); got != ports["metrics"] {
		t.Errorf("prometheus.io/port = %q, want the metrics port %s", got, ports["metrics"])
	}
	for _, p := range dig(svc, "spec", "ports").([]any) {
		if target := str(dig(p, "targetPort")); ports[target] == "" && !slices.Contains(slices.Collect(maps.Values(ports)), target) {
			t.Errorf("Service targetPort %q is no container port (%v)", target, ports)
		}
	}
	for probe, path := range map[string]string{"readinessProbe": "/readyz", "livenessProbe": "/healthz"} {
		port := str(dig(c, probe, "httpGet", "port"))
		if got := str(dig(c, probe, "httpGet", "path")); got != path || port != "http" {
			t.Errorf("%s = GET %s on port %q, want GET %s on the http port", probe, got, port, path)
		}
	}

	grace, _ := dig(dep, "spec", "template", "spec", "terminationGracePeriodSeconds").(int)
	sleep, _ := dig(c, "lifecycle", "preStop", "sleep", "seconds").(int)
	if time.Duration(grace)*time.Second <= time.Duration(sleep)*time.Second+cfg.ShutdownGrace {
		t.Errorf("terminationGracePeriodSeconds %d is not above the preStop sleep %ds plus SHUTDOWN_GRACE %v", grace, sleep, cfg.ShutdownGrace)
	}
	if time.Duration(sleep)*time.Second < cfg.DrainDelay {
		t.Errorf("preStop sleep %ds is shorter than DRAIN_DELAY %v", sleep, cfg.DrainDelay)
	}
	period, _ := dig(c, "readinessProbe", "periodSeconds").(int)
	failures, _ := dig(c, "readinessProbe", "failureThreshold").(int)
	if period < 1 || failures < 1 || time.Duration(period*failures)*time.Second >= cfg.DrainDelay {
		t.Errorf("readiness probe every %ds, %d failures: a drain is not noticed within DRAIN_DELAY %v", period, failures, cfg.DrainDelay)
	}
}

// TestDeployImage: .dockerignore keeps the repository's history, test data and local binaries out
// of the build context; -healthcheck finds the gateway on the address it really listens on (in
// LISTEN_ADDR_FILE), also when it was started with -listen-addr; the Dockerfile shows a stop
// timeout above SHUTDOWN_GRACE.
func TestDeployImage(t *testing.T) {
	raw, err := os.ReadFile(".dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	patterns := strings.Fields(string(regexp.MustCompile(`(?m)#.*$`).ReplaceAllString(string(raw), "")))
	for _, want := range []string{".git", "testdata", "**/testdata", "/voicegate", "*.test"} {
		if !slices.Contains(patterns, want) {
			t.Errorf(".dockerignore lacks %s (has %v)", want, patterns)
		}
	}
	dockerfile, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	stop := regexp.MustCompile(`--stop-timeout (\d+)`).FindSubmatch(dockerfile)
	if stop == nil {
		t.Error("the Dockerfile does not show --stop-timeout")
	} else if d, _ := time.ParseDuration(string(stop[1]) + "s"); d <= 25*time.Second {
		t.Errorf("the Dockerfile's --stop-timeout %v is not above SHUTDOWN_GRACE's default 25s", d)
	}
	if !regexp.MustCompile(`(?m)^ENV LISTEN_ADDR_FILE=/run/voicegate/addr$`).Match(dockerfile) {
		t.Error("the Dockerfile does not set LISTEN_ADDR_FILE")
	}

	file := filepath.Join(t.TempDir(), "addr")
	// The container's environment names a wrong address; the gateway was started with a flag.
	wrong := deadAddr(t)
	g := startRun(t, []string{"-listen-addr", "127.0.0.1:0"}, map[string]string{"ALGO_URL": "http://127.0.0.1:1",
		"LISTEN_ADDR": wrong, "LISTEN_ADDR_FILE": file})
	env := map[string]string{"LISTEN_ADDR": wrong, "LISTEN_ADDR_FILE": file}
	if _, _, err := runCommand(t, env, "-healthcheck"); err != nil {
		t.Errorf("-healthcheck with the gateway's LISTEN_ADDR_FILE: %v", err)
	}
	if b, _ := os.ReadFile(file); strings.TrimSpace(string(b)) != g.Addr {
		t.Errorf("LISTEN_ADDR_FILE holds %q, want %s", b, g.Addr)
	}
	if _, _, err := runCommand(t, env, "-healthcheck", "-listen-addr", wrong); err == nil {
		t.Error("-healthcheck -listen-addr <dead address> succeeded: the flag must win over the file")
	}
	g.stop()
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("LISTEN_ADDR_FILE left behind after the gateway stopped: %v", err)
	}
	if _, _, err := runCommand(t, env, "-healthcheck"); err == nil {
		t.Error("-healthcheck succeeded against a stopped gateway")
	}
}

// TestREADMEGoVersionAndTestTime: the README states the Go version the module needs and how long
// the tests take.
func TestREADMEGoVersionAndTestTime(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	mod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	goLine := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(mod)
	if goLine == nil {
		t.Fatal("go.mod has no go line")
	}
	if want := "Go " + string(goLine[1]) + " or later"; !strings.Contains(string(readme), want) {
		t.Errorf("README.md does not say %q (go.mod: go %s)", want, goLine[1])
	}
	if !regexp.MustCompile(`(?i)tests? take (about|around) \d+`).Match(readme) {
		t.Error("README.md does not say how long the tests take")
	}
}
