package saver

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// TestCheckUUID: tcp-info's UUIDs pass; anything that is not a plain file
// name fails with ErrBadUUID.
func TestCheckUUID(t *testing.T) {
	for _, u := range []string{
		"mlab1-lga0t.mlab-oti.measurement-lab.org_1700000000_0000000000012345",
		"ndt-k8s_1577000000_unsafe_00000000000000ab",
		"offline_20261125T232153.694760613Z_10.99.0.1_38918_10.99.0.2_8080",
		"a..b", "x", strings.Repeat("a", MaxUUIDLen),
	} {
		if err := CheckUUID(u); err != nil {
			t.Errorf("CheckUUID(%q) = %v, want nil", u, err)
		}
	}
	for _, u := range []string{
		"", ".", "..", "../../etc/cron.d/x", "a/b", "/abs", ".partial", ".hidden",
		"a\x00b", "line\nbreak", "del\x7f", strings.Repeat("a", MaxUUIDLen+1),
		"nel\u0085x", "rtl\u202eexe.pcap", "bad\xffutf8", "a b", "host_1_\u00e9",
	} {
		if err := CheckUUID(u); !errors.Is(err, ErrBadUUID) {
			t.Errorf("CheckUUID(%q) = %v, want ErrBadUUID", u, err)
		}
	}
}

// FuzzCheckUUID: whatever CheckUUID accepts is a plain file name of
// printable ASCII that JSON encodes as itself (the flow index quotes it).
func FuzzCheckUUID(f *testing.F) {
	f.Add("host_1764000000_0000000000001001")
	f.Add("nel\u0085x")
	f.Add("../x")
	f.Fuzz(func(t *testing.T, u string) {
		if CheckUUID(u) != nil {
			return
		}
		b, err := json.Marshal(u)
		if err != nil || string(b) != `"`+strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(u)+`"` && !strings.ContainsAny(u, "<>&") {
			t.Errorf("%q is not plain JSON: %s", u, b)
		}
		for i := 0; i < len(u); i++ {
			if u[i] <= ' ' || u[i] > '~' || u[i] == '/' {
				t.Errorf("%q accepted with byte %#x", u, u[i])
			}
		}
		if u[0] == '.' || len(u) > MaxUUIDLen {
			t.Errorf("%q accepted", u)
		}
	})
}
