package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"

	"voicegate/policy"
)

// runPolicy is "voicegate policy check FILE": it loads FILE as the gateway would at start,
// against this binary's route table, and prints the binding in force for every route that needs
// a token, saying which the file binds and which take the built-in binding because the file
// does not (a file written for an earlier release). A file the gateway would refuse is an
// error, so the exit status is non-zero.
func runPolicy(args []string, stdout, stderr io.Writer) error {
	usage := "usage: voicegate policy check FILE"
	if len(args) == 0 || args[0] != "check" {
		return errors.New("policy: " + usage)
	}
	fs := flag.NewFlagSet("voicegate policy check", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: voicegate policy check FILE\n\n"+
			"Loads FILE as POLICY_FILE is loaded at start and prints the binding in force for every\n"+
			"route: the file's, or the built-in policy's for a route the file does not bind.\n"+
			"Exits 1 when the gateway would refuse the file.\n")
	}
	if _, err := parseFlags(fs, args[1:], stderr); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("policy check: " + usage)
	}
	file := fs.Arg(0)
	// The routes are the same whatever the configuration: the optional ones need no token.
	routes := routeBindings(&config{})
	warnings := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{
		// The line for a person at a terminal: level, message and what it names.
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}}))
	store, err := policy.NewStore(policy.StoreOptions{Path: file, Routes: routes, ExtraPerms: handlerPerms, Log: warnings})
	if err != nil {
		return fmt.Errorf("policy check: %w", err)
	}
	p := store.Policy()
	printBindings(stdout, p.Bindings(), p.Unbound())
	return nil
}

// printBindings writes one line per route: its permission (and per-method ones), owner
// override, rate class and concurrency lease, and where its binding comes from.
func printBindings(w io.Writer, bs []policy.Binding, unbound []string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROUTE\tPERMISSION\tBY METHOD\tOWNER OVERRIDE\tCLASS\tLEASE\tBOUND BY")
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	for _, b := range bs {
		perm := b.Permission
		if perm == "" {
			perm = "(any caller with a token)"
		}
		var methods []string
		for _, m := range slices.Sorted(maps.Keys(b.Methods)) {
			methods = append(methods, m+"="+b.Methods[m])
		}
		from := "file"
		if slices.Contains(unbound, b.Route) {
			from = "built-in (not in the file)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", b.Route, perm, dash(strings.Join(methods, " ")),
			dash(b.OwnerOverride), dash(b.Class), dash(b.Lease), from)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "\n%d routes: %d bound by the file, %d by the built-in policy\n", len(bs), len(bs)-len(unbound), len(unbound))
}
