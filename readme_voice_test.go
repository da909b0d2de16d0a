package main

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// pythonWithWebsockets returns a Python that has the websockets library (Debian's
// python3-websockets installs it for /usr/bin/python3, which may not be the python3 on PATH).
func pythonWithWebsockets(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		bin, err := exec.LookPath(p)
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		err = exec.CommandContext(ctx, bin, "-c", "import websockets").Run()
		cancel()
		if err == nil {
			return bin
		}
	}
	missingTool(t, "python3 with the websockets library", "python3-websockets")
	return ""
}

// TestREADMEVoiceClient: the Python voice client of README.md, run as a newcomer would, holds a
// session with -demo: start and stop bring the answer, its audio and tts_complete.
func TestREADMEVoiceClient(t *testing.T) {
	py := pythonWithWebsockets(t)
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)### Voice from a terminal\n.*?```python\n(.*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no python block under ### Voice from a terminal")
	}
	script := filepath.Join(t.TempDir(), "voice.py")
	if err := os.WriteFile(script, m[1], 0o644); err != nil {
		t.Fatal(err)
	}
	g := startRun(t, []string{"-demo"}, map[string]string{"LISTEN_ADDR": "127.0.0.1:0"})
	var token string
	eventually(t, 2*time.Second, "-demo prints a token", func() bool {
		tm := regexp.MustCompile(`TOKEN=(\S+)`).FindStringSubmatch(g.Stdout.String())
		if tm != nil {
			token = tm[1]
		}
		return tm != nil
	})
	w := watchTokens(t, g)
	w.add(token)

	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, script, "ws://"+g.Addr+"/api/v2/voice/stream")
	cmd.Env = append(os.Environ(), "TOKEN="+token)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(stdin, "{\"type\":\"start\"}\n{\"type\":\"stop\"}\n"); err != nil {
		t.Fatal(err)
	}
	var seen []string
	audio := 0
	sc := bufio.NewScanner(stdout)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "<") && strings.HasSuffix(line, "bytes of audio>") {
			audio++
			continue
		}
		if tm := regexp.MustCompile(`"type":"([a-z_]+)"`).FindStringSubmatch(line); tm != nil {
			seen = append(seen, tm[1])
			if tm[1] == "tts_complete" {
				break
			}
		}
	}
	stdin.Close() // the client closes the session and ends
	_, _ = io.Copy(io.Discard, stdout)
	if err := cmd.Wait(); err != nil {
		t.Errorf("the client ended with %v\n%s", err, stderr.String())
	}
	for _, want := range []string{"session_initialized", "ack", "asr_final", "llm_response_chunk", "tts_start", "tts_complete"} {
		if !strings.Contains(strings.Join(seen, " "), want) {
			t.Errorf("the client printed no %s message (got %v)\n%s", want, seen, stderr.String())
		}
	}
	if audio == 0 {
		t.Error("the client printed no audio frames")
	}
}
