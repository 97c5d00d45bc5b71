package ec2test

import (
	"encoding/xml"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"
)

// TestFastXMLIsEncodingXML: the hand-written encoding of a DescribeInstances
// answer is byte for byte what encoding/xml writes for it, over answers
// whose every field (found by reflection, so a field added later is
// covered too) takes values that need escaping, invalid UTF-8, zero values
// that omitempty drops, nil pointers and empty lists.
func TestFastXMLIsEncodingXML(t *testing.T) {
	root := xml.Name{Space: namespace, Local: "DescribeInstancesResponse"}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 3000 {
		resp := &describeInstancesResponse{}
		fillRandom(rng, reflect.ValueOf(resp).Elem())
		fast, err := appendXMLDocument(nil, resp, root)
		if err != nil {
			t.Fatal(err)
		}
		slow, err := encodeXMLSlow(resp, root)
		if err != nil {
			t.Fatal(err)
		}
		if string(fast) != string(slow) {
			t.Fatalf("answer %d: fast encoding differs from encoding/xml\nfast: %s\nslow: %s", i, fast, slow)
		}
	}
}

var randomStrings = []string{"", "", "i-0123456789abcdef0", "a<b>&c", `say "hi" it's`, "tab\there\nnew\rline",
	"]]>", "\x01control", "bad\xffutf8", "snow ☃ and \U0001F600", "del\x7f", "   spaced   "}

// fillRandom sets every field under v to a random value.
func fillRandom(rng *rand.Rand, v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		v.SetString(randomStrings[rng.IntN(len(randomStrings))])
	case reflect.Int:
		v.SetInt(int64(rng.IntN(2001) - 1000))
	case reflect.Bool:
		v.SetBool(rng.IntN(2) == 0)
	case reflect.Pointer:
		if rng.IntN(2) == 0 {
			v.SetZero()
			return
		}
		v.Set(reflect.New(v.Type().Elem()))
		fillRandom(rng, v.Elem())
	case reflect.Slice:
		n := rng.IntN(4)
		if n == 0 && rng.IntN(2) == 0 {
			v.SetZero() // nil, which encoding/xml writes as it writes an empty one
			return
		}
		s := reflect.MakeSlice(v.Type(), n, n)
		for i := range n {
			fillRandom(rng, s.Index(i))
		}
		v.Set(s)
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fillRandom(rng, v.Field(i))
			}
		}
	default:
		panic("fillRandom: no values for " + v.Type().String())
	}
}

// BenchmarkDescribeInstancesEncode: one page of 1,000 instances, written by
// encoding/xml and by appendXML.
func BenchmarkDescribeInstancesEncode(b *testing.B) {
	root := xml.Name{Space: namespace, Local: "DescribeInstancesResponse"}
	resp := &describeInstancesResponse{header: header{RequestID: newRequestID()}}
	s := New(Options{})
	defer s.Close()
	rg := s.def
	for i := range 1000 {
		in := &instance{id: newHexID("i-"), image: "ami-0123456789abcdef0", typ: "t3.micro", zone: rg.zones[0],
			ip: "10.0.0.1", rootDevice: "/dev/xvda", volumeID: newHexID("vol-"), reservation: "r-1",
			tags: map[string]string{"hangar:owner": "bench", "hangar:pool": "demo", "Name": "demo-" + string(rune('a'+i%26))}}
		resp.Reservations = append(resp.Reservations, reservationXML{ReservationID: "r-1",
			Instances: []instanceXML{s.instanceXML(rg, in, time.Now())}})
	}
	b.Run("encoding-xml", func(b *testing.B) {
		for b.Loop() {
			out, err := encodeXMLSlow(resp, root)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(out)))
		}
	})
	b.Run("append", func(b *testing.B) {
		var buf []byte // reused, as writeXML reuses its buffers
		for b.Loop() {
			var err error
			if buf, err = appendXMLDocument(buf[:0], resp, root); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(buf)))
		}
	})
}
