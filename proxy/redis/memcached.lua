#!lua name=memshadow
--[[
Memcached 1.6.18 write semantics on Redis 7 (REFERENCE.md section 4).

One Redis string per memcached key:
    flags (uint32 BE, 4 bytes) | cas (uint64 BE, 8 bytes) | data
Each function touches exactly one key (KEYS[1]) and is atomic, so existence checks, cas
checks, flags and TTL handling cannot race. A new cas is max(old_cas + 1, now in us from
TIME): it grows for a key, never repeats after delete + re-create, and stays below 2^53.

Expiry arguments come in pairs (kind, value), see proxy/redis/layout.py:
    '0' no expiry | 'R' relative seconds (>= 1) | 'A' absolute unix ms | 'X' already expired
Replies are arrays whose first element is a status string; see each function.
]]

local HEADER_LEN = 12
local TWO32 = 4294967296
local U64_MAX = '18446744073709551615'
local TWO64 = '18446744073709551616'
local TWO63 = '9223372036854775808'
-- memcached items with non-zero client flags carry them in 4 extra bytes, so their size
-- limits are 4 bytes lower; the callers pass the limits for flags 0.
local FLAGS_OVERHEAD = 4

-- The load-time sandbox of Redis Functions hides the standard libraries, so they are looked
-- up at call time.
local function byte(s, i, j) return string.byte(s, i, j) end
local function char(...) return string.char(...) end
local function floor(x) return math.floor(x) end

local function fail(msg)
    return redis.error_reply('ERR memshadow: ' .. msg)
end

-- header ------------------------------------------------------------------------------------

local function u32be(n)
    return char(floor(n / 16777216) % 256, floor(n / 65536) % 256, floor(n / 256) % 256, n % 256)
end

local function pack_header(flags, cas)
    local hi = floor(cas / TWO32)
    return u32be(flags) .. u32be(hi) .. u32be(cas - hi * TWO32)
end

-- Returns flags, cas of a stored value (or of its first 12 bytes), nil when malformed.
local function unpack_header(raw)
    if #raw < HEADER_LEN then
        return nil
    end
    local f1, f2, f3, f4, c1, c2, c3, c4, c5, c6, c7, c8 = byte(raw, 1, HEADER_LEN)
    local flags = ((f1 * 256 + f2) * 256 + f3) * 256 + f4
    local hi = ((c1 * 256 + c2) * 256 + c3) * 256 + c4
    local lo = ((c5 * 256 + c6) * 256 + c7) * 256 + c8
    return flags, hi * TWO32 + lo
end

local function limit_for(limit, flags)
    if flags ~= 0 then
        return limit - FLAGS_OVERHEAD
    end
    return limit
end

local function cas_string(cas)
    return string.format('%.0f', cas)
end

local function next_cas(old_cas)
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    if old_cas ~= nil and old_cas + 1 > now then
        return old_cas + 1
    end
    return now
end

-- Reads only the header: flags, cas, or nil when the key is missing.
local function read_header(key)
    local raw = redis.call('GETRANGE', key, 0, HEADER_LEN - 1)
    if raw == '' then
        return nil
    end
    local flags, cas = unpack_header(raw)
    if flags == nil then
        error({err = 'ERR memshadow: malformed value header'})
    end
    return flags, cas
end

-- expiry ------------------------------------------------------------------------------------

local function check_kind(kind, what)
    if kind ~= '0' and kind ~= 'R' and kind ~= 'A' and kind ~= 'X' then
        error({err = 'ERR memshadow: bad ' .. what .. ' kind ' .. tostring(kind)})
    end
end

-- SET with the TTL of an expiry pair; 'K' keeps the current TTL. 'X' stores nothing: the
-- command succeeded in memcached but its item is already invisible, so the key goes away.
local function write(key, value, kind, val)
    if kind == 'K' then
        redis.call('SET', key, value, 'KEEPTTL')
    elseif kind == '0' then
        redis.call('SET', key, value)
    elseif kind == 'R' then
        redis.call('SET', key, value, 'EX', val)
    elseif kind == 'A' then
        redis.call('SET', key, value, 'PXAT', val)
    else
        redis.call('DEL', key)
    end
end

-- Changes the TTL of an existing key, as touch/gat do.
local function retime(key, kind, val)
    if kind == '0' then
        redis.call('PERSIST', key)
    elseif kind == 'R' then
        redis.call('EXPIRE', key, val)
    elseif kind == 'A' then
        redis.call('PEXPIREAT', key, val)
    else
        redis.call('DEL', key)
    end
end

-- exact unsigned 64-bit decimal arithmetic (Lua numbers are doubles) ------------------------

local function strip_zeros(s)
    local t = string.gsub(s, '^0+', '')
    if t == '' then
        return '0'
    end
    return t
end

-- Compares two canonical decimal strings.
local function dcmp(a, b)
    if #a ~= #b then
        return #a < #b and -1 or 1
    end
    if a == b then
        return 0
    end
    return a < b and -1 or 1
end

local function dadd(a, b)
    local out = {}
    local i, j, carry = #a, #b, 0
    while i >= 1 or j >= 1 or carry > 0 do
        local d = carry
        if i >= 1 then d = d + byte(a, i) - 48 end
        if j >= 1 then d = d + byte(b, j) - 48 end
        carry = d >= 10 and 1 or 0
        out[#out + 1] = d - carry * 10
        i, j = i - 1, j - 1
    end
    local digits = {}
    for k = #out, 1, -1 do
        digits[#digits + 1] = char(48 + out[k])
    end
    return strip_zeros(table.concat(digits))
end

-- a - b for canonical a >= b.
local function dsub(a, b)
    local out = {}
    local i, j, borrow = #a, #b, 0
    while i >= 1 do
        local d = byte(a, i) - 48 - borrow
        if j >= 1 then d = d - (byte(b, j) - 48) end
        if d < 0 then
            d, borrow = d + 10, 1
        else
            borrow = 0
        end
        out[#out + 1] = d
        i, j = i - 1, j - 1
    end
    local digits = {}
    for k = #out, 1, -1 do
        digits[#digits + 1] = char(48 + out[k])
    end
    return strip_zeros(table.concat(digits))
end

local function is_space(c)
    return c == 32 or (c >= 9 and c <= 13)
end

-- memcached's safe_strtoull() on item data, which is always followed by "\r\n": leading C
-- whitespace, one optional sign, digits, then whitespace, NUL or the end. Out of range is an
-- error; a '-' is accepted only when the wrapped result is below 2^63 ("-0" is 0). Returns
-- the canonical decimal string, or nil when memcached would answer "non-numeric".
local function parse_u64(s)
    local n, i = #s, 1
    while i <= n and is_space(byte(s, i)) do
        i = i + 1
    end
    local negative = false
    local c = byte(s, i)
    if c == 43 then
        i = i + 1
    elseif c == 45 then
        negative, i = true, i + 1
    end
    local first = i
    while i <= n do
        c = byte(s, i)
        if c < 48 or c > 57 then
            break
        end
        i = i + 1
    end
    if i == first then
        return nil
    end
    if i <= n then
        c = byte(s, i)
        if not (is_space(c) or c == 0) then
            return nil
        end
    end
    local magnitude = strip_zeros(string.sub(s, first, i - 1))
    if dcmp(magnitude, U64_MAX) > 0 then
        return nil
    end
    if negative and magnitude ~= '0' then
        local wrapped = dsub(TWO64, magnitude)
        if dcmp(wrapped, TWO63) >= 0 then
            return nil
        end
        return wrapped
    end
    return magnitude
end

local function check_u64(s, what)
    if type(s) ~= 'string' or #s == 0 or #s > 20 or string.find(s, '%D') then
        error({err = 'ERR memshadow: bad ' .. what})
    end
    local v = strip_zeros(s)
    if dcmp(v, U64_MAX) > 0 then
        error({err = 'ERR memshadow: bad ' .. what})
    end
    return v
end

-- functions ---------------------------------------------------------------------------------

--[[
mc_store KEYS[1]=key ARGV: mode flags exp_kind exp_val data cas maxlen [too_large_deletes]
  mode: set | add | replace | append | prepend | cas
  flags: uint32 decimal; exp_kind/exp_val: expiry pair. append/prepend keep the item's own
         flags and TTL, but the request's flags still count for the size check.
  cas: decimal; 'cas' compares it exactly (0 never matches); append/prepend compare it when
       it is not 0 (ms MA/MP with C); other modes ignore it.
  maxlen: largest data length memcached accepts for this key with flags 0 (4 less is used
          for non-zero flags).
  too_large_deletes: '1' / '0'; when absent or empty, only 'set' deletes (classic commands).
Reply: {status, cas} with status STORED | NOT_STORED | EXISTS | NOT_FOUND | TOO_LARGE and
cas the new cas after STORED, else 0.
]]
local function mc_store(keys, args)
    local key = keys[1]
    local mode, flags_s, kind, val, data = args[1], args[2], args[3], args[4], args[5]
    local req_cas = strip_zeros(args[6] or '0')
    local maxlen = tonumber(args[7])
    local big_del = args[8]
    check_kind(kind, 'exptime')
    local flags = tonumber(flags_s)
    if flags == nil or flags < 0 or flags >= TWO32 or flags ~= floor(flags) then
        return fail('bad flags')
    end
    if data == nil or maxlen == nil then
        return fail('wrong number of arguments for mc_store')
    end

    if #data > limit_for(maxlen, flags) then
        if big_del == '1' or ((big_del == nil or big_del == '') and mode == 'set') then
            redis.call('DEL', key)
        end
        return {'TOO_LARGE', 0}
    end

    if mode == 'append' or mode == 'prepend' then
        local raw = redis.call('GET', key)
        if not raw then
            return {'NOT_STORED', 0}
        end
        local old_flags, old_cas = unpack_header(raw)
        if old_flags == nil then
            return fail('malformed value header')
        end
        if req_cas ~= '0' and req_cas ~= cas_string(old_cas) then
            return {'EXISTS', 0}
        end
        local old_data = string.sub(raw, HEADER_LEN + 1)
        if #old_data + #data > limit_for(maxlen, old_flags) then
            return {'NOT_STORED', 0}
        end
        local cas = next_cas(old_cas)
        if mode == 'append' then
            write(key, pack_header(old_flags, cas) .. old_data .. data, 'K')
        else
            write(key, pack_header(old_flags, cas) .. data .. old_data, 'K')
        end
        return {'STORED', cas}
    end

    local _, old_cas = read_header(key)
    if mode == 'add' then
        if old_cas ~= nil then
            return {'NOT_STORED', 0}
        end
    elseif mode == 'replace' then
        if old_cas == nil then
            return {'NOT_STORED', 0}
        end
    elseif mode == 'cas' then
        if old_cas == nil then
            return {'NOT_FOUND', 0}
        end
        if req_cas == '0' or req_cas ~= cas_string(old_cas) then
            return {'EXISTS', 0}
        end
    elseif mode ~= 'set' then
        return fail('bad store mode ' .. tostring(mode))
    end
    local cas = next_cas(old_cas)
    write(key, pack_header(flags, cas) .. data, kind, val)
    return {'STORED', cas}
end

--[[
mc_delta KEYS[1]=key ARGV: op delta cas create_kind create_val initial ttl_kind ttl_val
                           [numeric_maxlen] [order]
  op: incr | decr; delta, initial: uint64 decimal; cas: decimal, 0 = no check.
  create_kind/create_val: expiry pair of ma's N flag; empty kind = do not autovivify.
  ttl_kind/ttl_val: expiry pair of ma's T flag; empty kind = keep the TTL. On an existing
                   item it only applies when the result is rewritten in place (below).
  numeric_maxlen: data longer than this is stored chunked by memcached and so is
                  non-numeric (slab_chunk_max - 59 - keylen, for flags 0; 4 less is used
                  for non-zero flags); absent = no limit.
  order: 'NT' (default) or 'TN', the order of N and T in the request; on autovivify the
         later one sets the TTL, as memcached applies them in flag order.
Reply: {'OK', new_value, cas} | {'CREATED', initial, cas} | {'NOT_FOUND'} | {'NON_NUMERIC'}
       | {'EXISTS'}.
Incr wraps modulo 2^64, decr stops at 0. A result not longer than the stored data is padded
with spaces to the old length (memcached rewrites such items in place). Flags and TTL stay.
]]
local function mc_delta(keys, args)
    local key = keys[1]
    local op = args[1]
    if op ~= 'incr' and op ~= 'decr' then
        return fail('bad delta op ' .. tostring(op))
    end
    local delta = check_u64(args[2], 'delta')
    local req_cas = check_u64(args[3] or '0', 'cas')
    local create_kind, create_val = args[4] or '', args[5]
    local initial = check_u64(args[6] ~= nil and args[6] ~= '' and args[6] or '0', 'initial')
    local ttl_kind, ttl_val = args[7] or '', args[8]
    local numeric_max = tonumber(args[9] or '')
    local order = args[10] or 'NT'
    if create_kind ~= '' then check_kind(create_kind, 'create') end
    if ttl_kind ~= '' then check_kind(ttl_kind, 'ttl') end

    local size = redis.call('STRLEN', key)
    if size == 0 then
        if create_kind == '' then
            return {'NOT_FOUND'}
        end
        local kind, val = create_kind, create_val
        if ttl_kind ~= '' and order == 'NT' then
            kind, val = ttl_kind, ttl_val
        end
        local cas = next_cas(nil)
        write(key, pack_header(0, cas) .. initial, kind, val)
        return {'CREATED', initial, cas}
    end

    -- memcached checks "empty or chunked" before the cas, and parses after it.
    local len = size - HEADER_LEN
    if len < 0 then
        return fail('malformed value header')
    end
    local flags, old_cas = read_header(key)
    if len == 0 or (numeric_max ~= nil and len > limit_for(numeric_max, flags)) then
        return {'NON_NUMERIC'}
    end
    local raw = redis.call('GET', key)
    if req_cas ~= '0' and req_cas ~= cas_string(old_cas) then
        return {'EXISTS'}
    end
    local data = string.sub(raw, HEADER_LEN + 1)
    local value = parse_u64(data)
    if value == nil then
        return {'NON_NUMERIC'}
    end
    if op == 'incr' then
        value = dadd(value, delta)
        if dcmp(value, TWO64) >= 0 then
            value = dsub(value, TWO64)
        end
    elseif dcmp(delta, value) > 0 then
        value = '0'
    else
        value = dsub(value, delta)
    end
    local stored = value
    if #value < #data then
        stored = value .. string.rep(' ', #data - #value)
    end
    local cas = next_cas(old_cas)
    -- memcached 1.6.18 applies ma's T to the item it rewrote in place; a longer number goes
    -- into a new item and T lands on the replaced one, so the TTL stays as it was.
    if ttl_kind ~= '' and #value <= #data then
        write(key, pack_header(flags, cas) .. stored, ttl_kind, ttl_val)
    else
        write(key, pack_header(flags, cas) .. stored, 'K')
    end
    return {'OK', value, cas}
end

--[[
mc_touch KEYS[1]=key ARGV: exp_kind exp_val
Reply: {'TOUCHED'} | {'NOT_FOUND'}. The cas does not change.
]]
local function mc_touch(keys, args)
    local key, kind, val = keys[1], args[1], args[2]
    check_kind(kind, 'exptime')
    if redis.call('EXISTS', key) == 0 then
        return {'NOT_FOUND'}
    end
    retime(key, kind, val)
    return {'TOUCHED'}
end

--[[
mc_delete KEYS[1]=key ARGV: [cas]
  cas absent or empty: unconditional. Otherwise it must equal the stored cas exactly
  (md C0 never matches an item).
Reply: {'DELETED'} | {'NOT_FOUND'} | {'EXISTS'}.
]]
local function mc_delete(keys, args)
    local key, req = keys[1], args[1]
    if req == nil or req == '' then
        if redis.call('DEL', key) == 1 then
            return {'DELETED'}
        end
        return {'NOT_FOUND'}
    end
    req = strip_zeros(req)
    local _, cas = read_header(key)
    if cas == nil then
        return {'NOT_FOUND'}
    end
    if req ~= cas_string(cas) then
        return {'EXISTS'}
    end
    redis.call('DEL', key)
    return {'DELETED'}
end

redis.register_function('mc_store', mc_store)
redis.register_function('mc_delta', mc_delta)
redis.register_function('mc_touch', mc_touch)
redis.register_function('mc_delete', mc_delete)
