package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// certCheckInterval is how often a handshake looks whether the certificate files changed: a
// renewed certificate is served within it, and a storm of handshakes costs one stat a second.
const certCheckInterval = time.Second

// certReloader serves TLS_CERT_FILE and TLS_KEY_FILE, reloaded when either file changes (a
// renewal by cert-manager, certbot or a rotated Kubernetes secret), without a restart.
// Handshakes never wait for a reload: the one that finds the check due makes it, the others
// are served the certificate in force; a pair that does not load (a renewal half written)
// leaves that certificate in force, and is tried again at the next check.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger
	now               func() time.Time

	cert     atomic.Pointer[tls.Certificate]
	checking sync.Mutex // held by the handshake that checks; others never wait for it
	next     time.Time  // when the files are next looked at; guarded by checking
	stamp    string     // the files' sizes and modification times when last loaded
}

// newCertReloader loads the pair once: a gateway whose certificate does not load does not
// start.
func newCertReloader(certFile, keyFile string, log *slog.Logger, now func() time.Time) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log, now: now}
	stamp, err := r.fileStamp()
	if err != nil {
		return nil, err
	}
	if err := r.load(stamp); err != nil {
		return nil, err
	}
	r.next = now().Add(certCheckInterval)
	return r, nil
}

// fileStamp says what the two files are now, to tell a change without reading them.
func (r *certReloader) fileStamp() (string, error) {
	var stamp string
	for _, f := range []string{r.certFile, r.keyFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return "", fmt.Errorf("tls: %w", err)
		}
		stamp += fmt.Sprintf("%d/%d;", fi.Size(), fi.ModTime().UnixNano())
	}
	return stamp, nil
}

func (r *certReloader) load(stamp string) error {
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("tls: load TLS_CERT_FILE and TLS_KEY_FILE: %w", err)
	}
	r.cert.Store(&cert)
	r.stamp = stamp
	return nil
}

// GetCertificate is tls.Config.GetCertificate.
func (r *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if r.checking.TryLock() {
		if now := r.now(); !now.Before(r.next) {
			r.next = now.Add(certCheckInterval)
			if stamp, err := r.fileStamp(); err == nil && stamp != r.stamp {
				if err := r.load(stamp); err != nil {
					r.log.Warn("the new TLS certificate does not load; the previous one is still served", "err", err)
				} else {
					r.log.Info("TLS certificate reloaded", "file", r.certFile)
				}
			}
		}
		r.checking.Unlock()
	}
	return r.cert.Load(), nil
}

// serverTLS is the listener's TLS configuration: TLS 1.2 and later, the certificate from r,
// and HTTP/2 beside HTTP/1.1 (http.Server.ServeTLS adds "h2"). WebSocket upgrades (voice,
// realtime) stay HTTP/1.1: Go's HTTP/2 server does not offer RFC 8441's extended CONNECT
// unless GODEBUG=http2xconnect=1, so browsers open their WebSockets on an HTTP/1.1 connection.
func serverTLS(r *certReloader) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: r.GetCertificate}
}

// http2Limits are the HTTP/2 server's limits, Go's defaults written out so that they are
// visible and tested: at most 250 concurrent streams per connection, so one client cannot open
// more at once (its chat streams count against its concurrency caps as well); Go's server also
// bounds the handlers a connection's reset streams leave running (rapid reset,
// CVE-2023-44487) and the header bytes of CONTINUATION frames to MaxHeaderBytes (CVE-2023-45288),
// which cannot be turned off.
func http2Limits() *http.HTTP2Config {
	return &http.HTTP2Config{MaxConcurrentStreams: 250, MaxReadFrameSize: 1 << 20}
}

// healthTLS is the TLS of -healthcheck, which asks the gateway on its own address: it trusts
// exactly the certificate in certFile, the one the gateway serves, and checks it for one of the
// names it carries (the public host's, which the loopback address it dials is not). So the
// probe passes only if the process answering serves that certificate, unexpired; a gateway that
// still serves the previous one for the second after a renewal (certCheckInterval) fails one
// probe.
func healthTLS(certFile string) (*tls.Config, error) {
	data, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("TLS_CERT_FILE: %w", err)
	}
	var leaf *x509.Certificate
	for block, rest := pem.Decode(data); block != nil && leaf == nil; block, rest = pem.Decode(rest) {
		if block.Type == "CERTIFICATE" {
			if leaf, err = x509.ParseCertificate(block.Bytes); err != nil {
				return nil, fmt.Errorf("TLS_CERT_FILE: %w", err)
			}
		}
	}
	if leaf == nil {
		return nil, errors.New("TLS_CERT_FILE holds no certificate")
	}
	var name string
	switch {
	case len(leaf.DNSNames) > 0:
		name = leaf.DNSNames[0] // a wildcard too: a name that is not a host's must match exactly
	case len(leaf.IPAddresses) > 0:
		name = leaf.IPAddresses[0].String()
	default:
		return nil, errors.New("TLS_CERT_FILE's certificate names no host")
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: name}, nil
}
