package main

import (
	"slices"
	"testing"
)

// TestParseClusterInfo: readiness reads cluster_state and cluster_slots_ok, whether the text
// comes plain (RESP2) or as a verbatim string with its format in front (RESP3).
func TestParseClusterInfo(t *testing.T) {
	for _, text := range []string{
		"cluster_state:fail\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\ncluster_slots_pfail:0\r\n",
		"txt:cluster_state:fail\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\n",
	} {
		got := parseClusterInfo(text)
		if !got.answered || got.state != "fail" || got.slotsOK != 10923 {
			t.Errorf("parseClusterInfo(%q) = %+v, want state fail, 10923 slots ok", text, got)
		}
	}
}

// TestParseSlotOwners: the slot owners are the masters that are not failing, by range, a slot
// being migrated left to MOVED and ASK; without any, nil.
func TestParseSlotOwners(t *testing.T) {
	text := "txt:" +
		"a1 10.0.0.1:6379@16379 myself,master - 0 0 1 connected 0-5460 [5461->-b2]\n" +
		"b2 10.0.0.2:6379@16379,host-b master - 0 0 2 connected 5461-10922\n" +
		"c3 10.0.0.3:6379@16379 master,fail - 0 0 3 disconnected 10923-16383\n" +
		"d4 10.0.0.4:6379@16379 slave a1 0 0 1 connected\n" +
		"e5 10.0.0.5:6379@16379 master - 0 0 5 connected 16000\n"
	got := parseSlotOwners(text)
	want := []slotOwner{{0, 5460, "10.0.0.1:6379"}, {5461, 10922, "10.0.0.2:6379"}, {16000, 16000, "10.0.0.5:6379"}}
	if !slices.Equal(got, want) {
		t.Errorf("parseSlotOwners = %+v, want %+v", got, want)
	}
	if got := parseSlotOwners("c3 10.0.0.3:6379@16379 master,fail? - 0 0 3 connected 0-16383\n"); got != nil {
		t.Errorf("only a failing master: %+v, want nil", got)
	}
}
