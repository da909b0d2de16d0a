package main

// TLS: the gateway serves HTTPS when TLS_CERT_FILE and TLS_KEY_FILE are set, with HTTP/2,
// certificates reloaded when the files change, chat streams over h2 exactly as over HTTP/1.1,
// and WebSockets (voice, realtime) on HTTP/1.1 upgrades. The certificates are made here.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// testCert writes a self-signed certificate for 127.0.0.1 and localhost with serial to
// certFile and keyFile (through renames, as a renewal would).
func testCert(t *testing.T, certFile, keyFile string, serial int64) {
	t.Helper()
	testCertFor(t, certFile, keyFile, serial, []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)})
}

// testCertFor is testCert for the names given.
func testCertFor(t *testing.T, certFile, keyFile string, serial int64, dnsNames []string, ips []net.IP) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "voicegate test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: ips, DNSNames: dnsNames,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
	writeAtomic(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// tlsFiles makes a certificate and returns the environment that serves it.
func tlsFiles(t *testing.T) (env map[string]string, certFile, keyFile string) {
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	testCert(t, certFile, keyFile, 1)
	return map[string]string{"TLS_CERT_FILE": certFile, "TLS_KEY_FILE": keyFile}, certFile, keyFile
}

// tlsTransport trusts the certificate in certFile (at the time of the call) and speaks HTTP/2
// where the server offers it.
func tlsTransport(t testing.TB, certFile string) *http.Transport {
	t.Helper()
	pem, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no certificate in " + certFile)
	}
	return &http.Transport{Proxy: nil, ForceAttemptHTTP2: true, TLSClientConfig: &tls.Config{RootCAs: pool}}
}

// TestTLSChatOverHTTP2: both chat streams arrive over HTTP/2 event by event: the first content
// is read while the upstream still holds the rest, and the stream ends as over HTTP/1.1.
func TestTLSChatOverHTTP2(t *testing.T) {
	t.Parallel()
	algo := newOpenAIAlgo(t)
	env, _, _ := tlsFiles(t)
	g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": algo.URL}))
	for _, c := range []struct{ path, body, want string }{
		{"/v1/chat/completions", `{"model":"default","stream":true,"messages":[{"role":"user","content":"hold"}]}`, `"content":"wait"`},
		{"/api/v2/chat/stream", `{"message":"hold"}`, `event: generation_chunk`},
	} {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, g.URL+c.path, strings.NewReader(c.body))
		req.Header.Set("Content-Type", "application/json")
		res, err := g.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if res.ProtoMajor != 2 || res.TLS == nil {
			t.Fatalf("%s: protocol %s, want HTTP/2 over TLS", c.path, res.Proto)
		}
		var got []byte
		buf := make([]byte, 4096)
		for !strings.Contains(string(got), c.want) {
			n, err := res.Body.Read(buf)
			if err != nil {
				t.Fatalf("%s: %v before %s arrived (%q)", c.path, err, c.want, got)
			}
			got = append(got, buf[:n]...)
		}
		// The upstream still holds the rest: what arrived was streamed, not buffered to the end.
		select {
		case <-algo.gone:
			t.Fatalf("%s: the upstream ended before the client read its first event", c.path)
		default:
		}
		res.Body.Close() // the client goes away: over h2, a RST_STREAM
		select {
		case <-algo.gone:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the upstream request was still running 5 s after the client's stream was reset", c.path)
		}
	}
	// A whole answer, [DONE] and all, over h2.
	res := postCompletion(t, g, tokenFor(t, "u-tls", []string{"user"}, nil), `{"model":"default","stream":true,"messages":[{"role":"user","content":"hi"}]}`, nil)
	if datas := chunks(t, res.Body); res.ProtoMajor != 2 || datas[len(datas)-1] != "[DONE]" {
		t.Fatalf("over %s the stream ended with %q", res.Proto, datas[len(datas)-1])
	}
}

// TestTLSCertificateReload: a certificate renewed on disk is served to new connections without
// a restart; a pair that does not load leaves the previous one in force.
func TestTLSCertificateReload(t *testing.T) {
	t.Parallel()
	algo := newOpenAIAlgo(t)
	env, certFile, keyFile := tlsFiles(t)
	g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": algo.URL}))
	serial := func() int64 {
		conn, err := tls.Dial("tcp", g.Addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	if s := serial(); s != 1 {
		t.Fatalf("serial %d, want 1", s)
	}
	// Half a renewal: a key that does not match. The old pair stays in force.
	other := filepath.Join(t.TempDir(), "other")
	testCert(t, other+".crt", other+".key", 7)
	key, _ := os.ReadFile(other + ".key")
	writeAtomic(t, keyFile, key)
	eventually(t, 10*time.Second, "the broken pair is noticed", func() bool {
		serial()
		return strings.Contains(g.Stderr.String(), "the new TLS certificate does not load")
	})
	if s := serial(); s != 1 {
		t.Fatalf("serial %d after a broken renewal, want the old certificate (1)", s)
	}
	testCert(t, certFile, keyFile, 2)
	eventually(t, 10*time.Second, "the renewed certificate is served", func() bool { return serial() == 2 })
}

// TestTLSVoiceStaysHTTP1: the voice WebSocket is an HTTP/1.1 upgrade over TLS (wss://), beside
// HTTP/2 for the rest; the HTTP/2 server does not offer extended CONNECT.
func TestTLSVoiceStaysHTTP1(t *testing.T) {
	t.Parallel()
	algo := newAlgo(t, algoOptions{})
	env, certFile, _ := tlsFiles(t)
	g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": algo.URL}))
	tr := tlsTransport(t, certFile)
	tr.ForceAttemptHTTP2 = false
	tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
	v := openVoiceWith(t, g, &http.Client{Transport: tr})
	if v == nil {
		t.Fatal("no voice session over wss")
	}
	// The same listener offers h2 to clients that ask for it.
	conn, err := tls.Dial("tcp", g.Addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q, want h2", p)
	}
}

func TestTLSConfigNeedsBoth(t *testing.T) {
	stderr, _ := runMain(t, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "JWT_SECRET": testSecret, "TLS_CERT_FILE": "x.pem"})
	if !strings.Contains(stderr, "TLS_CERT_FILE and TLS_KEY_FILE") {
		t.Fatalf("stderr %q", stderr)
	}
}

// openVoiceWith opens a voice session on g over wss:// with client, as user u-tls, and reads its
// session_initialized; it returns the 101's protocol.
func openVoiceWith(t *testing.T, g *testGateway, client *http.Client) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, res, err := websocket.Dial(ctx, "wss://"+g.Addr+"/api/v2/voice/stream", &websocket.DialOptions{
		HTTPClient: client, Subprotocols: []string{voiceSubprotocol},
		HTTPHeader: bearer(tokenFor(t, "u-tls", []string{"user"}, nil)),
	})
	if err != nil {
		t.Fatalf("wss dial: %v", err)
	}
	defer conn.CloseNow()
	_, msg, err := conn.Read(ctx)
	if err != nil || !strings.Contains(string(msg), `"session_initialized"`) {
		t.Fatalf("first message %s (%v)", msg, err)
	}
	if res.ProtoMajor != 1 {
		t.Fatalf("upgrade over %s", res.Proto)
	}
	return res
}

// TestTLSHTTP2Settings reads the HTTP/2 server's SETTINGS frame off the wire: at most 250
// concurrent streams and 1 MiB frames (http2Limits), and no ENABLE_CONNECT_PROTOCOL, so no
// client can open a WebSocket over HTTP/2 (RFC 8441): voice and realtime stay HTTP/1.1 upgrades.
func TestTLSHTTP2Settings(t *testing.T) {
	t.Parallel()
	env, _, _ := tlsFiles(t)
	g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": newAlgo(t, algoOptions{}).URL}))
	conn, err := tls.Dial("tcp", g.Addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	// The client preface and an empty SETTINGS frame.
	if _, err := conn.Write(append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)); err != nil {
		t.Fatal(err)
	}
	var head [9]byte
	if _, err := io.ReadFull(conn, head[:]); err != nil {
		t.Fatal(err)
	}
	n := int(head[0])<<16 | int(head[1])<<8 | int(head[2])
	if head[3] != 4 || n%6 != 0 {
		t.Fatalf("the server's first frame is of type %d and %d bytes, want SETTINGS", head[3], n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(conn, payload); err != nil {
		t.Fatal(err)
	}
	settings := map[uint16]uint32{}
	for i := 0; i < n; i += 6 {
		settings[binary.BigEndian.Uint16(payload[i:])] = binary.BigEndian.Uint32(payload[i+2:])
	}
	const maxStreams, maxFrame, connectProtocol = 0x3, 0x5, 0x8
	if settings[maxStreams] != 250 || settings[maxFrame] != 1<<20 {
		t.Errorf("MAX_CONCURRENT_STREAMS %d, MAX_FRAME_SIZE %d; want 250 and 1 MiB", settings[maxStreams], settings[maxFrame])
	}
	if v, ok := settings[connectProtocol]; ok && v != 0 {
		t.Errorf("ENABLE_CONNECT_PROTOCOL is %d: WebSockets could be opened over HTTP/2", v)
	}
}

// TestTLSHealthcheck: -healthcheck of a gateway serving TLS trusts exactly the certificate in
// TLS_CERT_FILE: it passes against the gateway serving it, and fails against a process serving
// another certificate for the same names, or with no TLS_CERT_FILE.
func TestTLSHealthcheck(t *testing.T) {
	t.Parallel()
	env, certFile, _ := tlsFiles(t)
	g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": "http://127.0.0.1:1"}))
	check := func(certFile string) error {
		vars := map[string]string{"LISTEN_ADDR": g.Addr}
		if certFile != "" {
			vars["TLS_CERT_FILE"], vars["TLS_KEY_FILE"] = certFile, env["TLS_KEY_FILE"]
		}
		_, _, err := runCommand(t, vars, "-healthcheck")
		return err
	}
	if err := check(certFile); err != nil {
		t.Errorf("-healthcheck with the certificate the gateway serves: %v", err)
	}
	other := filepath.Join(t.TempDir(), "other")
	testCert(t, other+".crt", other+".key", 7)
	if err := check(other + ".crt"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("-healthcheck trusting another certificate for the same names: %v, want a certificate error", err)
	}
	if err := check(""); err == nil {
		t.Error("-healthcheck over plain HTTP against a TLS listener passed")
	}

	// A certificate whose first name is a wildcard, as a public host's often is (its address
	// is there for the test's own client).
	dir := t.TempDir()
	wild := map[string]string{"TLS_CERT_FILE": filepath.Join(dir, "cert.pem"), "TLS_KEY_FILE": filepath.Join(dir, "key.pem")}
	testCertFor(t, wild["TLS_CERT_FILE"], wild["TLS_KEY_FILE"], 3, []string{"*.voice.example"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	w := startRun(t, nil, with(wild, map[string]string{"ALGO_URL": "http://127.0.0.1:1"}))
	if _, _, err := runCommand(t, with(wild, map[string]string{"LISTEN_ADDR": w.Addr}), "-healthcheck"); err != nil {
		t.Errorf("-healthcheck of a gateway serving a certificate for *.voice.example: %v", err)
	}
}
