package main

// The README and docs/ are kept true by tests: this file holds those of their shape (links,
// commands, the tables that name code) and the README's first tour, run as a newcomer runs it.
// The tests of what a table says about behaviour (settings, metrics) live with that behaviour.

import (
	"encoding/json"
	"errors"
	"go/ast"
	"go/parser"
	gotoken "go/token"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode"

	"voicegate/policy"
)

// docFiles returns README.md and every Markdown file under docs/.
func docFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no docs/*.md")
	}
	return append([]string{"README.md"}, files...)
}

func readDoc(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// fence matches a fenced code block: its info string and its text.
var fence = regexp.MustCompile("(?ms)^```([^\n]*)\n(.*?)^```[ \t]*$")

// withoutCode returns doc with its fenced blocks and inline code spans blanked out, so that
// what looks like a link or a heading inside code is not taken for one.
func withoutCode(doc string) string {
	doc = fence.ReplaceAllString(doc, "")
	return regexp.MustCompile("`[^`\n]*`").ReplaceAllString(doc, "``")
}

// githubAnchor is the anchor GitHub gives a heading: lower case, punctuation dropped (letters,
// digits, '-' and '_' stay), spaces made '-'. Code spans and emphasis lose their markers.
func githubAnchor(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(heading)) {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// docAnchors returns the anchors of doc's headings; a repeated heading gets -1, -2..., as on
// GitHub.
func docAnchors(doc string) map[string]bool {
	out := map[string]bool{}
	seen := map[string]int{}
	heading := regexp.MustCompile(`(?m)^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$`)
	for _, m := range heading.FindAllStringSubmatch(fence.ReplaceAllString(doc, ""), -1) {
		a := githubAnchor(m[1])
		if n := seen[a]; n > 0 {
			out[a+"-"+strconv.Itoa(n)] = true
		} else {
			out[a] = true
		}
		seen[a]++
	}
	return out
}

func TestGitHubAnchor(t *testing.T) {
	for heading, want := range map[string]string{
		"Sizing: past one box":           "sizing-past-one-box",
		"Redis's clock":                  "rediss-clock",
		"The console's origins":          "the-consoles-origins",
		"Upgrades, CONNECT and TRACE":    "upgrades-connect-and-trace",
		"Streaming chat (SSE contract)":  "streaming-chat-sse-contract",
		"`SSE_RESUME_WINDOW` and resume": "sse_resume_window-and-resume",
	} {
		if got := githubAnchor(heading); got != want {
			t.Errorf("githubAnchor(%q) = %q, want %q", heading, got, want)
		}
	}
	if got := docAnchors("# A\n## A\n```\n# not a heading\n```\n### A\n"); !reflect.DeepEqual(got, map[string]bool{"a": true, "a-1": true, "a-2": true}) {
		t.Errorf("repeated headings: %v", got)
	}
}

// TestDocsLinks: every relative link of README.md and docs/, and every anchor in one, leads
// somewhere: to a file or directory of the repository, and to a heading of that file.
func TestDocsLinks(t *testing.T) {
	link := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	anchors := map[string]map[string]bool{}
	for _, file := range docFiles(t) {
		for _, m := range link.FindAllStringSubmatch(withoutCode(readDoc(t, file)), -1) {
			target := m[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			path, frag, _ := strings.Cut(target, "#")
			dest := file
			if path != "" {
				dest = filepath.Join(filepath.Dir(file), path)
				if !filepath.IsLocal(dest) {
					t.Errorf("%s: %s leaves the repository", file, target)
					continue
				}
				if _, err := os.Stat(dest); err != nil {
					t.Errorf("%s: %s: no such file (%s)", file, target, dest)
					continue
				}
			}
			if frag == "" {
				continue
			}
			if filepath.Ext(dest) != ".md" {
				t.Errorf("%s: %s: an anchor into a file that is not Markdown", file, target)
				continue
			}
			if anchors[dest] == nil {
				anchors[dest] = docAnchors(readDoc(t, dest))
			}
			if !anchors[dest][frag] {
				t.Errorf("%s: %s: %s has no heading with that anchor", file, target, dest)
			}
		}
	}
}

// TestREADMEShape: the README stays short, runs the gateway with one command, and tests it with
// one: the command CI runs last.
func TestREADMEShape(t *testing.T) {
	readme := readDoc(t, "README.md")
	if n := strings.Count(readme, "\n"); n > 250 {
		t.Errorf("README.md has %d lines; it is the short way in (at most 250), the contracts go in docs/", n)
	}
	var runs, tests []string
	for _, m := range fence.FindAllStringSubmatch(readme, -1) {
		for _, line := range strings.Split(m[2], "\n") {
			line, _, _ = strings.Cut(line, "#")
			line = strings.TrimSpace(line)
			if strings.HasPrefix(line, "go test") {
				tests = append(tests, line)
			}
			if strings.HasSuffix(line, "go run . -demo") {
				runs = append(runs, line)
			}
		}
	}
	_, run, _ := strings.Cut(readme, "\n## Run it\n")
	run, _, _ = strings.Cut(run, "\n## ")
	if blocks := fence.FindAllStringSubmatch(run, -1); len(blocks) != 1 || strings.TrimSpace(blocks[0][2]) != "go run . -demo" {
		t.Errorf("## Run it has %d blocks, want the one command go run . -demo", len(blocks))
	}
	if len(runs) < 1 || runs[0] != "go run . -demo" {
		t.Errorf("the README's first command that runs the gateway is %q, want go run . -demo", runs)
	}

	ci := readDoc(t, ".ci/run")
	var last string
	for _, line := range strings.Split(ci, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "go test") {
			last = strings.TrimSpace(line)
		}
	}
	if len(tests) != 1 || tests[0] != last {
		t.Errorf("the README's test commands are %q, want exactly one, the last of .ci/run: %q", tests, last)
	}
}

// TestREADMESettings: the README's short table of settings names settings the code reads, with
// the code's defaults.
func TestREADMESettings(t *testing.T) {
	_, sec, ok := strings.Cut(readDoc(t, "README.md"), "\n## Settings\n")
	if !ok {
		t.Fatal(`README.md has no "## Settings" section`)
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	code := map[string]setting{}
	for _, s := range settings() {
		code[s.env] = s
	}
	tick := regexp.MustCompile("`([A-Z][A-Z0-9_]+)`")
	n := 0
	for _, line := range strings.Split(sec, "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		n++
		for _, m := range tick.FindAllStringSubmatch(cells[1], -1) {
			s, ok := code[m[1]]
			if !ok {
				t.Errorf("README.md's settings name %s, which the code does not read", m[1])
				continue
			}
			if s.def != "" && !strings.Contains(cells[3], "`"+s.def+"`") {
				t.Errorf("README.md's row for %s does not give its default `%s`: %s", s.env, s.def, line)
			}
		}
	}
	if n != 10 {
		t.Errorf("README.md's settings table has %d rows, want the ten that matter", n)
	}
	if !strings.Contains(sec, "(docs/configuration.md)") {
		t.Error("README.md's settings do not link to the complete table")
	}
}

// keyKinds returns the values of the Kind constants of policy/keys.go: every family of Redis
// key or channel the gateway names.
func keyKinds(t *testing.T) []string {
	t.Helper()
	f, err := parser.ParseFile(gotoken.NewFileSet(), "policy/keys.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != gotoken.CONST {
			continue
		}
		for _, spec := range g.Specs {
			v := spec.(*ast.ValueSpec)
			for i, name := range v.Names {
				if !strings.HasPrefix(name.Name, "Kind") || i >= len(v.Values) {
					continue
				}
				if lit, ok := v.Values[i].(*ast.BasicLit); ok && lit.Kind == gotoken.STRING {
					s, err := strconv.Unquote(lit.Value)
					if err != nil {
						t.Fatal(err)
					}
					kinds = append(kinds, s)
				}
			}
		}
	}
	if len(kinds) == 0 {
		t.Fatal("policy/keys.go has no Kind constants")
	}
	return kinds
}

// TestDocsKeyNames: docs/redis.md names every kind of Redis key and channel that policy.Keys
// makes, and every name it gives is of one of those kinds.
func TestDocsKeyNames(t *testing.T) {
	doc := readDoc(t, "docs/redis.md")
	keys := policy.NewKeys("voicegate:")
	names := regexp.MustCompile("`(voicegate:[^`]+)`").FindAllStringSubmatch(doc, -1)
	for _, kind := range keyKinds(t) {
		if !slices.ContainsFunc(names, func(m []string) bool { return keys.KindOf(m[1]) == kind }) {
			t.Errorf("docs/redis.md names no key of kind %q (policy/keys.go)", kind)
		}
	}
	for _, m := range names {
		if keys.KindOf(m[1]) == "" {
			t.Errorf("docs/redis.md names %s, which is of no kind policy.Keys makes", m[1])
		}
	}
}

// TestDocsPolicyExample: the worked policy file of docs/auth-and-policy.md is the fixture the
// policy tests compile, testdata/policy/good/readme.json.
func TestDocsPolicyExample(t *testing.T) {
	_, sec, ok := strings.Cut(readDoc(t, "docs/auth-and-policy.md"), "\n### The policy file\n")
	if !ok {
		t.Fatal(`docs/auth-and-policy.md has no "### The policy file" section`)
	}
	m := regexp.MustCompile("(?s)```json\n(.*?)```").FindStringSubmatch(sec)
	if m == nil {
		t.Fatal("docs/auth-and-policy.md has no json block under ### The policy file")
	}
	var doc, fixture any
	if err := json.Unmarshal([]byte(m[1]), &doc); err != nil {
		t.Fatalf("the worked policy file: %v", err)
	}
	if err := json.Unmarshal([]byte(readDoc(t, "testdata/policy/good/readme.json")), &fixture); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(doc, fixture) {
		t.Error("the worked policy file of docs/auth-and-policy.md differs from testdata/policy/good/readme.json")
	}
}

// benchmarks returns the names of the benchmark functions of the package in dir.
func benchmarks(t *testing.T, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*_test.go"))
	if err != nil {
		t.Fatal(err)
	}
	decl := regexp.MustCompile(`(?m)^func (Benchmark\w*)\(b \*testing\.B\)`)
	var names []string
	for _, f := range files {
		for _, m := range decl.FindAllStringSubmatch(readDoc(t, f), -1) {
			names = append(names, m[1])
		}
	}
	return names
}

// TestDocsBenchmarks: every benchmark the docs name exists, and every benchmark command of
// docs/benchmarks.md selects at least one benchmark in each package it names.
func TestDocsBenchmarks(t *testing.T) {
	t.Parallel()
	all := map[string]bool{}
	byPkg := map[string][]string{} // package directory → its benchmarks
	for _, dir := range []string{".", "auth", "policy", "proxy", "sse", "voice", "console", "openapi"} {
		byPkg[dir] = benchmarks(t, dir)
		for _, n := range byPkg[dir] {
			all[n] = true
		}
	}
	named := regexp.MustCompile(`\bBenchmark[A-Z]\w*`)
	for _, file := range docFiles(t) {
		for _, n := range named.FindAllString(readDoc(t, file), -1) {
			if !all[n] {
				t.Errorf("%s names %s, which no package defines", file, n)
			}
		}
	}

	_, sec, ok := strings.Cut(readDoc(t, "docs/benchmarks.md"), "\n## Commands\n")
	if !ok {
		t.Fatal(`docs/benchmarks.md has no "## Commands" section`)
	}
	m := fence.FindStringSubmatch(sec)
	if m == nil {
		t.Fatal("docs/benchmarks.md has no block of commands")
	}
	cmds := 0
	for _, line := range strings.Split(m[2], "\n") {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		i := slices.Index(f, "-bench")
		if i < 0 || i+1 >= len(f) {
			continue
		}
		cmds++
		pattern, err := regexp.Compile(strings.Trim(f[i+1], "'"))
		if err != nil {
			t.Errorf("%s: %v", line, err)
			continue
		}
		var pkgs []string
		for _, a := range f {
			if a == "." || strings.HasPrefix(a, "./") {
				pkgs = append(pkgs, a)
			}
		}
		if len(pkgs) == 0 {
			t.Errorf("%s: names no package", line)
		}
		for _, pkg := range pkgs {
			names, ok := byPkg[filepath.Clean(pkg)]
			if !ok {
				names = benchmarks(t, pkg)
			}
			if !slices.ContainsFunc(names, pattern.MatchString) {
				t.Errorf("%s: -bench %s selects no benchmark of %s", line, pattern, pkg)
			}
		}
	}
	if cmds == 0 {
		t.Error("docs/benchmarks.md has no benchmark commands")
	}
}

// ---- the README's first tour --------------------------------------------------------------

// tourBlock is a fenced block of README.md that an HTML comment on the line before it marks as a
// step of the first tour (<!-- tour: WHERE -->): where it runs, and its text.
type tourBlock struct {
	where string
	text  string
}

func readmeTour(t *testing.T) []tourBlock {
	t.Helper()
	marked := regexp.MustCompile("(?ms)^<!-- tour: (.+?) -->\n```[^\n]*\n(.*?)^```")
	var out []tourBlock
	for _, m := range marked.FindAllStringSubmatch(readDoc(t, "README.md"), -1) {
		out = append(out, tourBlock{where: m[1], text: m[2]})
	}
	return out
}

// freshClone copies the repository's files (those git tracks, and new ones it does not ignore)
// into a new directory, as a clone would have them. Outside a git checkout (an unpacked
// archive) it copies the tree but for what a build or the tour leaves behind.
func freshClone(t *testing.T) string {
	t.Helper()
	var names []string
	if list, err := exec.Command("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").Output(); err == nil {
		names = strings.Split(string(list), "\x00")
	} else {
		err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
			switch {
			case err != nil:
				return err
			case d.IsDir() && (d.Name() == ".git" || d.Name() == "node_modules"):
				return filepath.SkipDir
			case path == "voicegate" || path == "demo.secret" || path == "voice.py":
				return nil
			case d.Type().IsRegular():
				names = append(names, path)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	for _, name := range names {
		if name == "" {
			continue
		}
		info, err := os.Lstat(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue // deleted here, not yet in git
		}
		if err != nil {
			t.Fatal(err)
		}
		if !info.Mode().IsRegular() {
			continue
		}
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		dest := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dest, data, info.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// userEnv is the environment of a newcomer's terminal: this process's, without any setting of
// the gateway's (a developer's REDIS_URL must not change the tour) or a TOKEN, with python3 the
// one that has websockets (Debian's, with python3-websockets), and with go install writing to
// gobin instead of the machine's GOPATH.
func userEnv(t *testing.T, python, gobin string) []string {
	t.Helper()
	bin := t.TempDir()
	if err := os.Symlink(python, filepath.Join(bin, "python3")); err != nil {
		t.Fatal(err)
	}
	drop := map[string]bool{"TOKEN": true, "PATH": true, "GOBIN": true}
	for _, s := range settings() {
		drop[s.env] = true
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !drop[k] && !strings.HasPrefix(k, "OTEL_") {
			env = append(env, kv)
		}
	}
	return append(env, "PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"), "GOBIN="+gobin)
}

// demoTerminal is the terminal the tour runs the demo in: one block run by bash in a process
// group of its own, so that Ctrl-C (SIGINT to the group, as a terminal sends it) reaches go run
// and the gateway it started.
type demoTerminal struct {
	cmd         *exec.Cmd
	stdout      *logBuffer
	stderr      *logBuffer
	done        chan struct{}
	addr, token string // from the banner
}

func startDemoTerminal(t *testing.T, bash, dir string, env []string, block string) *demoTerminal {
	t.Helper()
	d := &demoTerminal{stdout: &logBuffer{}, stderr: &logBuffer{}, done: make(chan struct{})}
	d.cmd = exec.Command(bash, "--noprofile", "--norc", "-c", block)
	d.cmd.Dir = dir
	// The one change to a newcomer's terminal: any free port instead of 8080, which something
	// else on a shared machine may hold. The blocks of the other terminal are pointed at it.
	d.cmd.Env = append(slices.Clone(env), "LISTEN_ADDR=127.0.0.1:0")
	d.cmd.Stdout, d.cmd.Stderr = d.stdout, d.stderr
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	d.cmd.WaitDelay = 5 * time.Second
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
			<-d.done
		}
	})
	// The first run compiles the gateway in the new clone, which takes a while on a busy machine.
	deadline := time.Now().Add(5 * time.Minute)
	for !strings.Contains(d.stdout.String(), "Press Ctrl-C") {
		select {
		case <-d.done:
			t.Fatalf("the demo ended before its banner:\n%s\n%s", d.stdout, clipTail(d.stderr.String()))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no demo banner within 5 minutes:\n%s\n%s", d.stdout, clipTail(d.stderr.String()))
		}
		time.Sleep(50 * time.Millisecond)
	}
	banner := d.stdout.String()
	m := regexp.MustCompile(`DEMO MODE on http://(\S+)`).FindStringSubmatch(banner)
	if m == nil {
		t.Fatalf("the banner names no address:\n%s", banner)
	}
	d.addr = m[1]
	return d
}

// ctrlC stops the demo as Ctrl-C in its terminal does, and waits for it to end.
func (d *demoTerminal) ctrlC(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(-d.cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.done:
	case <-time.After(time.Minute):
		t.Fatalf("the demo did not stop within a minute of Ctrl-C:\n%s", clipTail(d.stderr.String()))
	}
}

// tourShell is the terminal the tour types its commands into: one bash, reading what is typed
// from a pipe of its own, so that variables set by one command are there for the next, as in a
// terminal; the programs it runs read a keyboard (their stdin) that the test types into.
type tourShell struct {
	cmd      *exec.Cmd
	typed    io.WriteCloser // what is typed at the prompt
	keyboard io.WriteCloser // what the program running reads
	out      *logBuffer     // stdout and stderr, interleaved as on a terminal
	seen     int            // of out, what earlier commands printed
	n        int            // commands so far
}

func startTourShell(t *testing.T, bash, dir string, env []string) *tourShell {
	t.Helper()
	typedR, typedW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s := &tourShell{typed: typedW, out: &logBuffer{}}
	s.cmd = exec.Command(bash, "--noprofile", "--norc", "/dev/fd/3")
	s.cmd.Dir = dir
	s.cmd.Env = env
	s.cmd.ExtraFiles = []*os.File{typedR}
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	s.cmd.WaitDelay = 5 * time.Second
	if s.keyboard, err = s.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	typedR.Close()
	t.Cleanup(func() {
		s.keyboard.Close()
		s.typed.Close()
		done := make(chan struct{})
		go func() { _ = s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = s.cmd.Process.Kill()
			<-done
		}
	})
	return s
}

// start types command (one line, or several) at the prompt.
func (s *tourShell) start(t *testing.T, command string) {
	t.Helper()
	if _, err := io.WriteString(s.typed, strings.TrimRight(command, "\n")+"\n"); err != nil {
		t.Fatal(err)
	}
}

// finish waits, at most within, for what was typed to end, and returns what it printed and the
// exit status of its last command.
func (s *tourShell) finish(t *testing.T, within time.Duration) (string, int) {
	t.Helper()
	s.n++
	mark := "@@tour-" + strconv.Itoa(s.n) + "@@"
	s.start(t, `printf '\n%s %d\n' '`+mark+`' "$?"`)
	re := regexp.MustCompile(regexp.QuoteMeta(mark) + ` (\d+)\n`)
	var m []int
	deadline := time.Now().Add(within)
	for m == nil {
		if time.Now().After(deadline) {
			t.Fatalf("the command did not end within %v; it printed:\n%s", within, clipTail(s.out.String()[s.seen:]))
		}
		time.Sleep(20 * time.Millisecond)
		m = re.FindStringSubmatchIndex(s.out.String()[s.seen:])
	}
	all := s.out.String()[s.seen:]
	status, _ := strconv.Atoi(all[m[2]:m[3]])
	out := strings.TrimSuffix(all[:m[0]], "\n")
	s.seen += m[1]
	return out, status
}

// run types command and waits for it, at most within; it fails the test unless it exits 0.
func (s *tourShell) run(t *testing.T, command string, within time.Duration) string {
	t.Helper()
	s.start(t, command)
	out, status := s.finish(t, within)
	if status != 0 {
		t.Fatalf("%s\nexited %d:\n%s", command, status, clipTail(out))
	}
	return out
}

// TestREADMETour runs the README's first tour as a newcomer does, in a fresh copy of the
// repository with two terminals: the demo is started in one exactly as the README says (go run
// . -demo, compiled in the clone), the other gets the token line the demo printed, pasted, then
// runs each block in order, with what it sets kept for the next. Each outcome is checked: the
// build makes a binary, the chat stream ends with stream_end, the voice client prints the
// transcript and the speech, and a token minted with a secret of one's own is accepted. Every
// command the demo's banner prints is one of the tour's, so the banner is runnable from a
// fresh clone too. It runs in parallel with the package's other slow, waiting tests, after the
// rest.
func TestREADMETour(t *testing.T) {
	t.Parallel()
	bash := requireTool(t, "bash", "/bin/bash", "bash")
	requireTool(t, "curl", "/usr/bin/curl", "curl")
	requireTool(t, "openssl", "/usr/bin/openssl", "openssl")
	requireTool(t, "go", "/usr/local/go/bin/go", "golang")
	python := pythonWithWebsockets(t)
	clone := freshClone(t)
	gobin := t.TempDir()
	env := userEnv(t, python, gobin)
	blocks := readmeTour(t)
	next := func(where string) string {
		t.Helper()
		if len(blocks) == 0 {
			t.Fatalf("README.md's tour has no more blocks; want one for %q", where)
		}
		b := blocks[0]
		blocks = blocks[1:]
		if b.where != where {
			t.Fatalf("README.md's next tour block is for %q, want %q:\n%s", b.where, where, b.text)
		}
		return b.text
	}
	var demo *demoTerminal
	here := func(text string) string { return strings.ReplaceAll(text, "127.0.0.1:8080", demo.addr) }
	// Lines of tour blocks, with continued lines joined: what the banner's commands must be.
	var tourLines []string
	for _, b := range blocks {
		for _, line := range strings.Split(regexp.MustCompile(`\\\n\s*`).ReplaceAllString(b.text, ""), "\n") {
			line, _, _ = strings.Cut(line, " #")
			tourLines = append(tourLines, strings.TrimSpace(line))
		}
	}
	checkBanner := func() {
		t.Helper()
		for _, line := range strings.Split(demo.stdout.String(), "\n") {
			cmd := strings.TrimSpace(line)
			if !strings.HasPrefix(line, "  ") || cmd == "" || strings.HasPrefix(cmd, "http") || strings.Contains(cmd, "TOKEN=ey") {
				continue
			}
			cmd = strings.ReplaceAll(cmd, demo.addr, "127.0.0.1:8080")
			if !slices.Contains(tourLines, cmd) {
				t.Errorf("the demo's banner prints %q, which is not a command of the README's tour", cmd)
			}
		}
	}

	// Terminal 1: the demo.
	demo = startDemoTerminal(t, bash, clone, env, next("terminal 1"))
	checkBanner()
	sh := startTourShell(t, bash, clone, env)

	// Terminal 2: building, then installing.
	for _, bin := range []string{filepath.Join(clone, "voicegate"), filepath.Join(gobin, "voicegate")} {
		sh.run(t, next("terminal 2"), 5*time.Minute)
		out, err := exec.Command(bin, "-version").Output()
		if err != nil || !strings.HasPrefix(string(out), "voicegate ") {
			t.Errorf("%s -version: %q, %v", bin, out, err)
		}
	}

	// The token line the demo printed, pasted into terminal 2 as the README says.
	m := regexp.MustCompile(`(?m)^[ \t]*(\S*\s*TOKEN=(\S+))[ \t]*$`).FindStringSubmatch(demo.stdout.String())
	if m == nil {
		t.Fatalf("the demo printed no token line:\n%s", demo.stdout)
	}
	demo.token = m[2]
	sh.run(t, m[1], 10*time.Second)

	// The console the banner points at, and what the demo user may not do.
	console := regexp.MustCompile(`http://\S+/console#token=\S+`).FindString(demo.stdout.String())
	if res, err := http.Get(console); err != nil || res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/html") {
		t.Errorf("the console %s: %v %v", console, describeResult(res, err), err)
	} else {
		res.Body.Close()
	}
	req, _ := http.NewRequest("GET", "http://"+demo.addr+"/api/v2/voice/sessions", nil)
	req.Header.Set("Authorization", "Bearer "+demo.token)
	if res, err := http.DefaultClient.Do(req); err != nil || res.StatusCode != http.StatusForbidden {
		t.Errorf("the demo user lists voice sessions: %v, want 403", describeResult(res, err))
	} else {
		res.Body.Close()
	}

	// A chat answer, streamed.
	out := sh.run(t, here(next("terminal 2")), time.Minute)
	for _, want := range []string{"event: stream_start", "event: generation_chunk", "event: generation_done", "event: stream_end"} {
		if !strings.Contains(out, want) {
			t.Errorf("curl printed no %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "event: error") {
		t.Errorf("the stream has an error:\n%s", out)
	}

	// Voice from a terminal: the client saved, run, the two lines typed, then Ctrl-D.
	if err := os.WriteFile(filepath.Join(clone, "voice.py"), []byte(next("save as voice.py")), 0o644); err != nil {
		t.Fatal(err)
	}
	command, typed, _ := strings.Cut(here(next("terminal 2, typing the lines after the first")), "\n")
	sh.start(t, command)
	if _, err := io.WriteString(sh.keyboard, typed); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(sh.out.String()[sh.seen:], `"type":"tts_complete"`) {
		if time.Now().After(deadline) {
			t.Fatalf("the voice client printed no tts_complete within a minute:\n%s", clipTail(sh.out.String()[sh.seen:]))
		}
		time.Sleep(20 * time.Millisecond)
	}
	sh.keyboard.Close() // Ctrl-D
	out, status := sh.finish(t, 30*time.Second)
	if status != 0 {
		t.Errorf("the voice client exited %d:\n%s", status, clipTail(out))
	}
	for _, want := range []string{`"type":"session_initialized"`, `"type":"asr_final"`, `"text":"what can voicegate do for my voice assistant"`,
		`"type":"llm_response_chunk"`, `"type":"tts_start"`, " bytes of audio>", `"type":"tts_complete"`} {
		if !strings.Contains(out, want) {
			t.Errorf("the voice client printed no %s:\n%s", want, clipTail(out))
		}
	}

	// Tokens of one's own: Ctrl-C, the demo again with a secret in a file, a token minted with it
	// in terminal 2.
	demo.ctrlC(t)
	demo = startDemoTerminal(t, bash, clone, env, next("terminal 1"))
	checkBanner()
	if !strings.Contains(demo.stdout.String(), "your JWT_SECRET") {
		t.Errorf("the demo does not say it uses the secret given:\n%s", demo.stdout)
	}
	if info, err := os.Stat(filepath.Join(clone, "demo.secret")); err != nil {
		t.Error(err)
	} else if info.Mode().Perm()&0o077 != 0 {
		t.Errorf("demo.secret has mode %v; want a file only its owner reads", info.Mode())
	}
	out = sh.run(t, here(next("terminal 2")), 2*time.Minute)
	if lines := strings.Split(strings.TrimSpace(out), "\n"); lines[len(lines)-1] != "200" {
		t.Errorf("the minted admin token lists voice sessions with %q, want 200", out)
	}

	if len(blocks) > 0 {
		t.Errorf("README.md's tour has blocks this test does not run: %v", blocks)
	}
}
