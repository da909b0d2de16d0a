package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// buildVersion is the version the go command stamped into the binary: the module version
// (v1.2.3, or a pseudo-version such as v0.0.0-20250101120000-abcdef123456 for a build from a
// git checkout), else the VCS revision, else "devel" (a build without VCS information, such as
// the image's, whose build context leaves .git out).
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev string
	dirty := false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "devel"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if dirty {
		rev += "-dirty"
	}
	return "devel-" + rev
}

// printVersion answers -version.
func printVersion(w io.Writer) {
	fmt.Fprintf(w, "voicegate %s (%s, %s/%s)\n", buildVersion(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
