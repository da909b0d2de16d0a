package main

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// readmeChatReader returns the fetch() stream reader of docs/chat.md, as the doc prints it.
func readmeChatReader(t *testing.T) string {
	t.Helper()
	readme, err := os.ReadFile("docs/chat.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)## Reading a stream from a browser\n.*?```js\n(.*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("docs/chat.md has no js block under ## Reading a stream from a browser")
	}
	return string(m[1])
}

// TestREADMEChatReaderUnderNode: the README's fetch() reader, run by node against a real
// gateway, parses every event of an answer whose strings hold raw U+2028 and U+2029 (line
// ends to JavaScript, valid inside JSON strings) and U+0085: the gateway escapes them in the
// data lines, so a reader that takes a data field to the end of its line gets all of it.
func TestREADMEChatReaderUnderNode(t *testing.T) {
	node := requireTool(t, "node", "/usr/bin/node", "nodejs")
	chunks := []string{"first\u2028second", "para\u2029graph", "next\u0085line", "plain"}
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		var lines []string
		for _, c := range chunks {
			// Written by hand, raw: encoding/json would escape U+2028 and U+2029 itself.
			lines = append(lines, `{"type":"generation_chunk","content":"`+c+`","meta":{"k`+"\u2028"+`":"v`+"\u2029"+`"}}`)
		}
		lines = append(lines, `{"type":"generation_done","content":"`+"\u2028"+`"}`)
		ndjson(w, lines...)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	w := watchTokens(t, g)
	token := w.token(t, "u-readme-reader", []string{"user"}, nil)

	// The snippet as printed, pointed at this gateway; what it logs is collected and printed
	// as one JSON line at the end.
	snippet := strings.ReplaceAll(readmeChatReader(t), "http://127.0.0.1:8080", g.URL)
	script := "const token = process.env.TOKEN;\n" +
		"const seen = [];\n" +
		"const print = console.log;\n" +
		"console.log = (event, data) => seen.push({ event, data });\n" +
		snippet + "\n" +
		"print(JSON.stringify(seen));\n"
	file := filepath.Join(t.TempDir(), "reader.mjs") // an ES module: top-level await
	if err := os.WriteFile(file, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, file)
	cmd.Env = append(os.Environ(), "TOKEN="+token)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the README's reader failed under node: %v\n%s", err, stderr.String())
	}
	var seen []struct {
		Event string         `json:"event"`
		Data  map[string]any `json:"data"`
	}
	if err := json.Unmarshal(out, &seen); err != nil {
		t.Fatalf("the reader printed %q: %v", out, err)
	}
	var names, content []string
	for _, e := range seen {
		names = append(names, e.Event)
		if e.Event == "generation_chunk" {
			c, _ := e.Data["content"].(string)
			content = append(content, c)
			if m, _ := e.Data["meta"].(map[string]any); m["k\u2028"] != "v\u2029" {
				t.Errorf("a chunk's meta is %v, want the upstream's", e.Data["meta"])
			}
		}
	}
	want := "stream_start generation_chunk generation_chunk generation_chunk generation_chunk generation_done stream_end"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("the reader parsed %q, want %q", got, want)
	}
	if strings.Join(content, "|") != strings.Join(chunks, "|") {
		t.Errorf("the chunks read %q, want %q", content, chunks)
	}
}
