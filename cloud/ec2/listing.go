package ec2

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	smithytime "github.com/aws/smithy-go/time"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/hangar-ci/hangar/cloud"
)

// Why List does not let the SDK decode its pages: a DescribeInstances page
// of 1,000 instances is megabytes of XML, and the SDK's generic decoder
// builds every field of every instance (~60 of them, with their sets), at
// about 65 µs an instance here: 650 ms of a 10,000-instance pool's
// reconcile cycle (BenchmarkReconcile10k in ./pool). The pool reads ten
// fields. leanPage replaces only the decoding of List's successful answers
// with one pass over the bytes that keeps those ten; the request, its
// signing, retries, rate limits and error answers stay the SDK's.

// leanPage receives one DescribeInstances page decoded by scanInstances.
// Its option is given to that one call; a retried attempt overwrites it.
type leanPage struct {
	instances []cloud.Instance
	nextToken string
}

// option swaps the operation's decoder for the lean one.
func (p *leanPage) option(o *ec2.Options) {
	o.APIOptions = append(o.APIOptions, func(stack *middleware.Stack) error {
		sdk, ok := stack.Deserialize.Get(leanDecoder{}.ID())
		if !ok {
			return fmt.Errorf("the sdk's DescribeInstances has no %s to replace", leanDecoder{}.ID())
		}
		_, err := stack.Deserialize.Swap(leanDecoder{}.ID(), leanDecoder{page: p, sdk: sdk})
		return err
	})
}

// leanDecoder decodes a successful answer into its page and leaves error
// answers to the SDK's decoder, which turns EC2's error codes into the
// errors the retryer and errors.go classify.
type leanDecoder struct {
	page *leanPage
	sdk  middleware.DeserializeMiddleware
}

func (leanDecoder) ID() string { return "OperationDeserializer" }

func (d leanDecoder) HandleDeserialize(ctx context.Context, in middleware.DeserializeInput, next middleware.DeserializeHandler) (
	middleware.DeserializeOutput, middleware.Metadata, error,
) {
	out, md, err := next.HandleDeserialize(ctx, in)
	resp, ok := out.RawResponse.(*smithyhttp.Response)
	if err != nil || !ok || resp.StatusCode < 200 || resp.StatusCode >= 300 {
		return d.sdk.HandleDeserialize(ctx, in, answered{out, md, err})
	}
	buf := answerBuffers.Get().(*bytes.Buffer)
	defer func() {
		// scanInstances copies what it keeps out of the answer, and so
		// does the error's snapshot.
		if buf.Cap() <= keptBuffer {
			buf.Reset()
			answerBuffers.Put(buf)
		}
	}()
	if resp.ContentLength > 0 && resp.ContentLength < maxAnswer {
		buf.Grow(int(resp.ContentLength) + bytes.MinRead)
	}
	_, err = buf.ReadFrom(io.LimitReader(resp.Body, maxAnswer+1))
	smithyhttp.CloseResponseBody(ctx, resp, false, err)
	body := buf.Bytes()
	if err == nil && len(body) > maxAnswer {
		err = fmt.Errorf("more than %d MiB", maxAnswer>>20)
	}
	if err != nil {
		return out, md, &smithy.DeserializationError{Err: fmt.Errorf("reading the DescribeInstances answer: %w", err)}
	}
	instances, nextToken, err := scanInstances(body)
	if err != nil {
		return out, md, &smithy.DeserializationError{Err: fmt.Errorf("decoding the DescribeInstances answer: %w", err), Snapshot: bytes.Clone(body[:min(len(body), 1024)])}
	}
	d.page.instances, d.page.nextToken = instances, nextToken
	out.Result = &ec2.DescribeInstancesOutput{NextToken: &nextToken}
	return out, md, nil
}

// answerBuffers keeps the buffers pages are read into: a page is
// megabytes, read every reconcile cycle.
var answerBuffers = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxAnswer bounds a page's answer: 1,000 instances take 2–4 MiB.
// keptBuffer bounds the buffers kept for the next page.
const (
	maxAnswer  = 256 << 20
	keptBuffer = 16 << 20
)

// answered is a DeserializeHandler that returns an answer already
// received, for the SDK's decoder to read.
type answered struct {
	out middleware.DeserializeOutput
	md  middleware.Metadata
	err error
}

func (a answered) HandleDeserialize(context.Context, middleware.DeserializeInput) (middleware.DeserializeOutput, middleware.Metadata, error) {
	return a.out, a.md, a.err
}

// What an element is, from its path in a DescribeInstancesResponse. Names
// match as the SDK's decoder matches them: the local name, ignoring case.
type elemKind uint8

const (
	kIgnored elemKind = iota
	kRoot
	kNextToken
	kReservationSet
	kReservation
	kInstancesSet
	kInstance
	kInstanceID
	kImageID
	kInstanceType
	kLaunchIndex
	kLaunchTime
	kPrivateIP
	kPublicIP
	kState
	kStateName
	kPlacement
	kZone
	kTagSet
	kTag
	kTagKey
	kTagValue
)

// children lists, for each kind of element the scanner reads inside, the
// children it reads; any other child is kIgnored, with all it holds.
var children = [kTagValue + 1][]struct {
	name string
	kind elemKind
}{
	kRoot:           {{"reservationSet", kReservationSet}, {"nextToken", kNextToken}},
	kReservationSet: {{"item", kReservation}},
	kReservation:    {{"instancesSet", kInstancesSet}},
	kInstancesSet:   {{"item", kInstance}},
	kInstance: {{"instanceId", kInstanceID}, {"imageId", kImageID}, {"instanceType", kInstanceType},
		{"amiLaunchIndex", kLaunchIndex}, {"launchTime", kLaunchTime}, {"privateIpAddress", kPrivateIP}, {"ipAddress", kPublicIP},
		{"instanceState", kState}, {"placement", kPlacement}, {"tagSet", kTagSet}},
	kState:     {{"name", kStateName}},
	kPlacement: {{"availabilityZone", kZone}},
	kTagSet:    {{"item", kTag}},
	kTag:       {{"key", kTagKey}, {"value", kTagValue}},
}

// childKind is the kind of an element named name inside one of kind parent.
func childKind(parent elemKind, name []byte) elemKind {
	// An ASCII name folds only to names of its length: most candidates are
	// passed over without a look at their bytes.
	ascii := true
	for _, c := range name {
		if c >= utf8.RuneSelf {
			ascii = false
			break
		}
	}
	for _, c := range children[parent] {
		if ascii && len(name) != len(c.name) {
			continue
		}
		if equalFold(name, c.name) {
			return c.kind
		}
	}
	return kIgnored
}

// equalFold is strings.EqualFold(string(b), s) for a name s in ASCII,
// without converting b unless it holds other characters (which may fold
// to ASCII ones: the Kelvin sign to k).
func equalFold(b []byte, s string) bool {
	if len(b) != len(s) {
		for _, c := range b {
			if c >= utf8.RuneSelf {
				return strings.EqualFold(string(b), s)
			}
		}
		return false
	}
	for i := range len(b) {
		c, d := b[i], s[i]
		if c == d {
			continue
		}
		if c >= utf8.RuneSelf {
			return strings.EqualFold(string(b), s)
		}
		if c|0x20 != d|0x20 || c|0x20 < 'a' || c|0x20 > 'z' {
			return false
		}
	}
	return true
}

// scanInstances reads a DescribeInstances answer: its reservations'
// instances and its nextToken. It is a strict scanner for the XML a Query
// API answers in: a declaration, elements with attributes and namespace
// prefixes, character data with the predefined and numeric character
// references, CDATA sections and comments. A document type declaration, a
// tag that does not close the element it is in, an unknown reference or
// text outside the root is an error.
func scanInstances(b []byte) ([]cloud.Instance, string, error) {
	type frame struct {
		kind     elemKind
		name     []byte
		content  int // where its content starts
		children bool
	}
	var (
		stack     []frame
		out       []cloud.Instance
		nextToken string
		tagKey    string
		tagValue  string
		rootSeen  bool
	)
	// leaf sets what a leaf element's text means.
	// last is the instance being read: its fields come only inside its
	// item, once start has added it to out.
	last := func() *cloud.Instance { return &out[len(out)-1] }
	// leaf sets what a leaf element's text means.
	leaf := func(kind elemKind, text string) error {
		switch kind {
		case kNextToken:
			nextToken = text
		case kTagKey:
			tagKey = text
		case kTagValue:
			tagValue = text
		case kInstanceID:
			last().ID = text
		case kImageID:
			last().Image = text
		case kInstanceType:
			last().Type = text
		case kPrivateIP:
			last().PrivateIP = text
		case kPublicIP:
			last().PublicIP = text
		case kStateName:
			last().State = stateOf(types.InstanceStateName(text))
		case kZone:
			last().Zone = text
		case kLaunchIndex:
			if text == "" {
				break // as the SDK: an empty element leaves it 0
			}
			n, err := strconv.ParseInt(text, 10, 32)
			if err != nil {
				return fmt.Errorf("instance %s: launch index: %w", last().ID, err)
			}
			last().LaunchIndex = int(n)
		case kLaunchTime:
			t, err := smithytime.ParseDateTime(text)
			if err != nil {
				return fmt.Errorf("instance %s: launch time: %w", last().ID, err)
			}
			last().LaunchedAt = t
		}
		return nil
	}
	// start and end act on the kinds with a beginning and an end.
	start := func(kind elemKind) {
		switch kind {
		case kInstance:
			out = append(out, cloud.Instance{State: cloud.StateUnknown})
		case kTag:
			tagKey, tagValue = "", ""
		}
	}
	end := func(kind elemKind) {
		if kind == kTag {
			in := last()
			if in.Tags == nil {
				in.Tags = make(map[string]string, 4)
			}
			in.Tags[tagKey] = tagValue
		}
	}

	i := 0
	for i < len(b) {
		lt := bytes.IndexByte(b[i:], '<')
		if lt < 0 {
			if len(stack) > 0 {
				return nil, "", fmt.Errorf("the answer ends inside <%s>", stack[len(stack)-1].name)
			}
			if !isSpace(b[i:]) {
				return nil, "", fmt.Errorf("text after the root element at byte %d", i)
			}
			break
		}
		if len(stack) == 0 && !isSpace(b[i:i+lt]) {
			return nil, "", fmt.Errorf("text outside the root element at byte %d", i)
		}
		i += lt
		rest := b[i:]
		var second byte
		if len(rest) > 1 {
			second = rest[1]
		}
		switch second {
		case '?':
			end := bytes.Index(rest, []byte("?>"))
			if end < 0 {
				return nil, "", fmt.Errorf("unterminated processing instruction at byte %d", i)
			}
			i += end + 2
		case '!':
			switch {
			case bytes.HasPrefix(rest, []byte("<!--")):
				end := bytes.Index(rest[4:], []byte("-->"))
				if end < 0 {
					return nil, "", fmt.Errorf("unterminated comment at byte %d", i)
				}
				i += 4 + end + 3
			case bytes.HasPrefix(rest, []byte("<![CDATA[")):
				if len(stack) == 0 {
					return nil, "", fmt.Errorf("text outside the root element at byte %d", i)
				}
				end := bytes.Index(rest, []byte("]]>"))
				if end < 0 {
					return nil, "", fmt.Errorf("unterminated CDATA section at byte %d", i)
				}
				i += end + 3
			default:
				return nil, "", fmt.Errorf("declaration at byte %d: a DescribeInstances answer has none", i)
			}
		case '/':
			if len(stack) == 0 {
				return nil, "", fmt.Errorf("end tag outside any element at byte %d", i)
			}
			f := stack[len(stack)-1]
			gt := 2 + len(f.name)
			if len(rest) <= gt || rest[gt] != '>' || !bytes.Equal(rest[2:gt], f.name) {
				// Not the plain </name>: spaces before the '>', or a
				// mismatch.
				gt = bytes.IndexByte(rest, '>')
				if gt < 0 {
					return nil, "", fmt.Errorf("unterminated end tag at byte %d", i)
				}
				qname := rest[2:gt]
				for len(qname) > 0 && isSpace(qname[len(qname)-1:]) {
					qname = qname[:len(qname)-1]
				}
				if !bytes.Equal(qname, f.name) {
					return nil, "", fmt.Errorf("end tag </%s> at byte %d closes <%s>", qname, i, f.name)
				}
			}
			if f.kind != kIgnored && !f.children {
				text, err := charData(b[f.content:i])
				if err != nil {
					return nil, "", fmt.Errorf("in <%s>: %w", f.name, err)
				}
				if err := leaf(f.kind, text); err != nil {
					return nil, "", err
				}
			}
			end(f.kind)
			stack = stack[:len(stack)-1]
			i += gt + 1
		default:
			n := 1
			for n < len(rest) && !isNameEnd(rest[n]) {
				n++
			}
			qname := rest[1:n]
			if len(qname) == 0 {
				return nil, "", fmt.Errorf("tag without a name at byte %d", i)
			}
			var gt int
			var selfClosing bool
			switch {
			case n < len(rest) && rest[n] == '>':
				gt = n
			case n+1 < len(rest) && rest[n] == '/' && rest[n+1] == '>':
				gt, selfClosing = n+1, true
			default:
				// Attributes, or not a tag.
				var err error
				if gt, selfClosing, err = tagEnd(rest); err != nil {
					return nil, "", fmt.Errorf("tag at byte %d: %w", i, err)
				}
			}
			var kind elemKind
			if len(stack) == 0 {
				if rootSeen {
					return nil, "", fmt.Errorf("a second root element <%s> at byte %d", qname, i)
				}
				rootSeen = true
				kind = kRoot
			} else {
				parent := &stack[len(stack)-1]
				parent.children = true
				if parent.kind != kIgnored {
					kind = childKind(parent.kind, localName(qname))
				}
			}
			i += gt + 1
			start(kind)
			if selfClosing {
				if err := leaf(kind, ""); err != nil {
					return nil, "", err
				}
				end(kind)
				continue
			}
			stack = append(stack, frame{kind: kind, name: qname, content: i})
		}
	}
	if !rootSeen {
		return nil, "", fmt.Errorf("the answer has no root element")
	}
	if len(stack) > 0 {
		return nil, "", fmt.Errorf("the answer ends inside <%s>", stack[len(stack)-1].name)
	}
	return out, nextToken, nil
}

// tagEnd finds the '>' that ends the start tag at the beginning of b, past
// quoted attribute values, and whether the tag closes itself.
func tagEnd(b []byte) (gt int, selfClosing bool, err error) {
	var quote byte
	for j := 1; j < len(b); j++ {
		c := b[j]
		switch {
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case c == '"' || c == '\'':
			quote = c
		case c == '<':
			return 0, false, fmt.Errorf("'<' inside a tag")
		case c == '>':
			return j, b[j-1] == '/', nil
		}
	}
	return 0, false, fmt.Errorf("unterminated tag")
}

// isNameEnd: what ends a tag's name, or cannot be in one.
func isNameEnd(c byte) bool {
	switch c {
	case ' ', '\t', '\r', '\n', '/', '>', '<', '"', '\'', '=':
		return true
	}
	return false
}

// localName drops a namespace prefix.
func localName(qname []byte) []byte {
	if j := bytes.IndexByte(qname, ':'); j >= 0 {
		return qname[j+1:]
	}
	return qname
}

func isSpace(b []byte) bool {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\r' && c != '\n' {
			return false
		}
	}
	return true
}

// charData is the text of a leaf element's raw content: references
// resolved, CDATA sections taken as written, comments and processing
// instructions dropped, "\r\n" and "\r" read as "\n" as XML requires.
func charData(raw []byte) (string, error) {
	if bytes.IndexByte(raw, '&') < 0 && bytes.IndexByte(raw, '<') < 0 && bytes.IndexByte(raw, '\r') < 0 {
		return string(raw), nil
	}
	var s []byte
	for i := 0; i < len(raw); {
		switch {
		case raw[i] == '&':
			semi := bytes.IndexByte(raw[i:], ';')
			if semi < 0 {
				return "", fmt.Errorf("unterminated reference %q", raw[i:min(len(raw), i+12)])
			}
			ref := raw[i+1 : i+semi]
			r, err := reference(ref)
			if err != nil {
				return "", err
			}
			s = utf8.AppendRune(s, r)
			i += semi + 1
		case bytes.HasPrefix(raw[i:], []byte("<![CDATA[")):
			end := bytes.Index(raw[i:], []byte("]]>"))
			s = appendNewlines(s, raw[i+9:i+end])
			i += end + 3
		case bytes.HasPrefix(raw[i:], []byte("<!--")):
			i += 4 + bytes.Index(raw[i+4:], []byte("-->")) + 3
		case bytes.HasPrefix(raw[i:], []byte("<?")):
			i += bytes.Index(raw[i:], []byte("?>")) + 2
		default:
			n := bytes.IndexAny(raw[i:], "&<")
			if n < 0 {
				n = len(raw) - i
			}
			s = appendNewlines(s, raw[i:i+n])
			i += n
		}
	}
	return string(s), nil
}

// appendNewlines appends text to s with "\r\n" and "\r" read as "\n".
func appendNewlines(s, text []byte) []byte {
	for {
		cr := bytes.IndexByte(text, '\r')
		if cr < 0 {
			return append(s, text...)
		}
		s = append(append(s, text[:cr]...), '\n')
		text = text[cr+1:]
		if len(text) > 0 && text[0] == '\n' {
			text = text[1:]
		}
	}
}

// reference resolves a character or predefined entity reference (without
// its & and ;).
func reference(ref []byte) (rune, error) {
	switch string(ref) {
	case "amp":
		return '&', nil
	case "lt":
		return '<', nil
	case "gt":
		return '>', nil
	case "quot":
		return '"', nil
	case "apos":
		return '\'', nil
	}
	if len(ref) > 1 && ref[0] == '#' {
		var n uint64
		var err error
		if ref[1] == 'x' {
			n, err = strconv.ParseUint(string(ref[2:]), 16, 32)
		} else {
			n, err = strconv.ParseUint(string(ref[1:]), 10, 32)
		}
		if err == nil && isXMLChar(rune(n)) {
			return rune(n), nil
		}
	}
	return 0, fmt.Errorf("unknown or invalid reference &%s;", ref)
}

// isXMLChar is XML 1.0's Char production.
func isXMLChar(r rune) bool {
	return r == 0x09 || r == 0x0A || r == 0x0D ||
		r >= 0x20 && r <= 0xD7FF ||
		r >= 0xE000 && r <= 0xFFFD ||
		r >= 0x10000 && r <= 0x10FFFF
}
