// ferrofast's Metal compatibility layer: the parts of the Metal Shading Language standard
// library and of MLX's Metal kernel utilities (`mlx/backend/metal/kernels/utils.h`) that
// custom kernels use, written in CUDA C++ for kernels translated from Metal. NVRTC gets it as
// the in-memory header "ferrofast_metal.cuh"; the program is compiled with
// `-default-device`, so unannotated functions and namespace-scope variables are device code.
//
// It includes no CUDA headers: half and bfloat are 16-bit structs converted with PTX or bit
// operations (arithmetic happens in f32 and rounds once, which gives the correctly rounded
// result Metal's native 16-bit arithmetic gives), so a bare libnvrtc compiles it.
//
// Dispatch model (see `ff_thread_info` and the generated entry kernel): every CUDA block is
// one Metal threadgroup of the requested size; threads past the grid in the last blocks skip
// the kernel body, and SIMD-group functions work over the lanes that run it.
#pragma once

// ----- integer types ------------------------------------------------------------------------

typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace metal {

// ----- type traits --------------------------------------------------------------------------

template <bool B, typename T = void> struct enable_if {};
template <typename T> struct enable_if<true, T> { typedef T type; };
template <bool B, typename T = void> using enable_if_t = typename enable_if<B, T>::type;

template <bool B, typename T, typename F> struct conditional { typedef T type; };
template <typename T, typename F> struct conditional<false, T, F> { typedef F type; };
template <bool B, typename T, typename F>
using conditional_t = typename conditional<B, T, F>::type;

template <typename A, typename B> struct is_same { static constexpr bool value = false; };
template <typename A> struct is_same<A, A> { static constexpr bool value = true; };
template <typename A, typename B> constexpr bool is_same_v = is_same<A, B>::value;

template <typename T> struct remove_cv { typedef T type; };
template <typename T> struct remove_cv<const T> { typedef T type; };
template <typename T> struct remove_cv<volatile T> { typedef T type; };
template <typename T> struct remove_cv<const volatile T> { typedef T type; };
template <typename T> using remove_cv_t = typename remove_cv<T>::type;

template <typename T> struct ff_integral { static constexpr bool value = false; };
#define FF_INTEGRAL(T) \
    template <> struct ff_integral<T> { static constexpr bool value = true; };
FF_INTEGRAL(bool)
FF_INTEGRAL(char)
FF_INTEGRAL(signed char)
FF_INTEGRAL(unsigned char)
FF_INTEGRAL(short)
FF_INTEGRAL(unsigned short)
FF_INTEGRAL(int)
FF_INTEGRAL(unsigned int)
FF_INTEGRAL(long)
FF_INTEGRAL(unsigned long)
FF_INTEGRAL(long long)
FF_INTEGRAL(unsigned long long)
#undef FF_INTEGRAL

template <typename T> struct is_integral {
    static constexpr bool value = ff_integral<remove_cv_t<T>>::value;
};
template <typename T> constexpr bool is_integral_v = is_integral<T>::value;

struct half;
struct bfloat;

template <typename T> struct ff_floating { static constexpr bool value = false; };
template <> struct ff_floating<float> { static constexpr bool value = true; };
template <> struct ff_floating<double> { static constexpr bool value = true; };
template <> struct ff_floating<half> { static constexpr bool value = true; };
template <> struct ff_floating<bfloat> { static constexpr bool value = true; };
template <typename T> struct is_floating_point {
    static constexpr bool value = ff_floating<remove_cv_t<T>>::value;
};
template <typename T> constexpr bool is_floating_point_v = is_floating_point<T>::value;

template <typename T> struct is_arithmetic {
    static constexpr bool value = is_integral<T>::value || is_floating_point<T>::value;
};
template <typename T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;

template <typename T> struct is_signed {
    static constexpr bool value = is_floating_point<T>::value ||
                                  (is_integral<T>::value && (T)(-1) < (T)0);
};
template <typename T> constexpr bool is_signed_v = is_signed<T>::value;
template <typename T> struct is_unsigned {
    static constexpr bool value = is_integral<T>::value && !is_signed<T>::value;
};
template <typename T> constexpr bool is_unsigned_v = is_unsigned<T>::value;

// Built-in arithmetic types (not half/bfloat): the other operand of mixed 16-bit arithmetic.
template <typename T> struct ff_builtin {
    static constexpr bool value = is_integral<T>::value || is_same<remove_cv_t<T>, float>::value ||
                                  is_same<remove_cv_t<T>, double>::value;
};

// ----- half and bfloat ----------------------------------------------------------------------

__forceinline__ float ff_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__forceinline__ unsigned short ff_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__forceinline__ float ff_bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned)b) << 16);
}

// Round to nearest even; NaN stays a quiet NaN.
__forceinline__ unsigned short ff_f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

struct ff_bits_tag {};

// Metal's `half`: IEEE binary16. Converts implicitly from every arithmetic type but only to
// float (a conversion template that matches float alone): to integers, bool and double only
// explicitly (static_cast, conditions). So `c ? h : 0` and `f += h` have one meaning each, as
// in Metal; `c ? h : 0.0f` is ambiguous and needs a cast.
struct alignas(2) half {
    unsigned short bits;
    half() = default;
    constexpr half(ff_bits_tag, unsigned short b) : bits(b) {}
    template <typename U, typename = enable_if_t<ff_builtin<U>::value>>
    __forceinline__ half(U v) : bits(ff_f32_to_f16((float)v)) {}
    __forceinline__ half(bfloat v);
    template <typename U, enable_if_t<is_same<U, float>::value, int> = 0>
    __forceinline__ operator U() const { return ff_f16_to_f32(bits); }
    template <typename U,
              enable_if_t<is_integral<U>::value || is_same<U, double>::value, int> = 0>
    __forceinline__ explicit operator U() const { return (U)ff_f16_to_f32(bits); }
};

// Metal's `bfloat` (MLX's `bfloat16_t`): the upper 16 bits of an f32.
struct alignas(2) bfloat {
    unsigned short bits;
    bfloat() = default;
    constexpr bfloat(ff_bits_tag, unsigned short b) : bits(b) {}
    template <typename U, typename = enable_if_t<ff_builtin<U>::value>>
    __forceinline__ bfloat(U v) : bits(ff_f32_to_bf16((float)v)) {}
    __forceinline__ bfloat(half v) : bits(ff_f32_to_bf16((float)v)) {}
    template <typename U, enable_if_t<is_same<U, float>::value, int> = 0>
    __forceinline__ operator U() const { return ff_bf16_to_f32(bits); }
    template <typename U,
              enable_if_t<is_integral<U>::value || is_same<U, double>::value, int> = 0>
    __forceinline__ explicit operator U() const { return (U)ff_bf16_to_f32(bits); }
};

__forceinline__ half::half(bfloat v) : bits(ff_f32_to_f16((float)v)) {}

typedef half float16_t;
typedef bfloat bfloat16_t;

template <typename T> struct ff_is16 { static constexpr bool value = false; };
template <> struct ff_is16<half> { static constexpr bool value = true; };
template <> struct ff_is16<bfloat> { static constexpr bool value = true; };

// The type of `a op b` when one side is half or bfloat: the 16-bit type with itself or an
// integer, float/double with those, float for half with bfloat.
template <typename A, typename B, typename = void> struct ff_mixed {};
template <typename H> struct ff_mixed<H, H, enable_if_t<ff_is16<H>::value>> { typedef H type; };
template <> struct ff_mixed<half, bfloat> { typedef float type; };
template <> struct ff_mixed<bfloat, half> { typedef float type; };
template <typename H, typename I>
struct ff_mixed<H, I, enable_if_t<ff_is16<H>::value && is_integral<I>::value>> {
    typedef H type;
};
template <typename I, typename H>
struct ff_mixed<I, H, enable_if_t<ff_is16<H>::value && is_integral<I>::value>> {
    typedef H type;
};
template <typename H>
struct ff_mixed<H, float, enable_if_t<ff_is16<H>::value>> { typedef float type; };
template <typename H>
struct ff_mixed<float, H, enable_if_t<ff_is16<H>::value>> { typedef float type; };
template <typename H>
struct ff_mixed<H, double, enable_if_t<ff_is16<H>::value>> { typedef double type; };
template <typename H>
struct ff_mixed<double, H, enable_if_t<ff_is16<H>::value>> { typedef double type; };

// Arithmetic in f32 (f64 with a double operand), rounded once to the result type.
template <typename R, typename A>
__forceinline__ typename conditional<is_same<R, double>::value, double, float>::type ff_wide(A a) {
    return (typename conditional<is_same<R, double>::value, double, float>::type)a;
}

#define FF_H_BINOP(op)                                                                    \
    template <typename A, typename B, typename R = typename ff_mixed<A, B>::type>          \
    __forceinline__ R operator op(A a, B b) {                                              \
        return R(ff_wide<R>(a) op ff_wide<R>(b));                                          \
    }
FF_H_BINOP(+)
FF_H_BINOP(-)
FF_H_BINOP(*)
FF_H_BINOP(/)
#undef FF_H_BINOP

#define FF_H_CMP(op)                                                                      \
    template <typename A, typename B, typename R = typename ff_mixed<A, B>::type>          \
    __forceinline__ bool operator op(A a, B b) {                                           \
        return ff_wide<R>(a) op ff_wide<R>(b);                                             \
    }
FF_H_CMP(==)
FF_H_CMP(!=)
FF_H_CMP(<)
FF_H_CMP(>)
FF_H_CMP(<=)
FF_H_CMP(>=)
#undef FF_H_CMP

#define FF_H_ASSIGN(op)                                                                   \
    template <typename H, typename U, typename = enable_if_t<ff_is16<H>::value>>            \
    __forceinline__ H& operator op##=(H& a, U b) {                                         \
        a = H((float)a op (float)b);                                                       \
        return a;                                                                          \
    }
FF_H_ASSIGN(+)
FF_H_ASSIGN(-)
FF_H_ASSIGN(*)
FF_H_ASSIGN(/)
#undef FF_H_ASSIGN

template <typename H, typename = enable_if_t<ff_is16<H>::value>>
__forceinline__ H operator-(H a) {
    H r;
    r.bits = (unsigned short)(a.bits ^ 0x8000u);
    return r;
}
template <typename H, typename = enable_if_t<ff_is16<H>::value>>
__forceinline__ H operator+(H a) {
    return a;
}
template <typename H, typename = enable_if_t<ff_is16<H>::value>>
__forceinline__ H& operator++(H& a) {
    a = H((float)a + 1.0f);
    return a;
}
template <typename H, typename = enable_if_t<ff_is16<H>::value>>
__forceinline__ H& operator--(H& a) {
    a = H((float)a - 1.0f);
    return a;
}
template <typename H, typename = enable_if_t<ff_is16<H>::value>>
__forceinline__ H operator++(H& a, int) {
    H old = a;
    a = H((float)a + 1.0f);
    return old;
}
template <typename H, typename = enable_if_t<ff_is16<H>::value>>
__forceinline__ H operator--(H& a, int) {
    H old = a;
    a = H((float)a - 1.0f);
    return old;
}

// ----- numeric_limits -----------------------------------------------------------------------

template <typename T> struct numeric_limits;

#define FF_INT_LIMITS(T, LO, HI)                                                           \
    template <> struct numeric_limits<T> {                                                 \
        static constexpr bool is_specialized = true;                                       \
        static constexpr bool is_integer = true;                                           \
        static constexpr T min() { return LO; }                                            \
        static constexpr T lowest() { return LO; }                                         \
        static constexpr T max() { return HI; }                                            \
    };
FF_INT_LIMITS(bool, false, true)
FF_INT_LIMITS(char, (char)-128, (char)127)
FF_INT_LIMITS(signed char, (signed char)-128, (signed char)127)
FF_INT_LIMITS(unsigned char, (unsigned char)0, (unsigned char)255)
FF_INT_LIMITS(short, (short)-32768, (short)32767)
FF_INT_LIMITS(unsigned short, (unsigned short)0, (unsigned short)65535)
FF_INT_LIMITS(int, -2147483647 - 1, 2147483647)
FF_INT_LIMITS(unsigned int, 0u, 4294967295u)
FF_INT_LIMITS(long, -9223372036854775807l - 1, 9223372036854775807l)
FF_INT_LIMITS(unsigned long, 0ul, 18446744073709551615ul)
FF_INT_LIMITS(long long, -9223372036854775807ll - 1, 9223372036854775807ll)
FF_INT_LIMITS(unsigned long long, 0ull, 18446744073709551615ull)
#undef FF_INT_LIMITS

#define FF_FLOAT_LIMITS(T, MK, BITS, MIN, MAX, LOWEST, EPS, INF, NAN_, DENORM)             \
    template <> struct numeric_limits<T> {                                                 \
        static constexpr bool is_specialized = true;                                       \
        static constexpr bool is_integer = false;                                          \
        static constexpr bool has_infinity = true;                                         \
        static constexpr bool has_quiet_NaN = true;                                        \
        static constexpr T min() { return MK(BITS, MIN); }                                 \
        static constexpr T max() { return MK(BITS, MAX); }                                 \
        static constexpr T lowest() { return MK(BITS, LOWEST); }                           \
        static constexpr T epsilon() { return MK(BITS, EPS); }                             \
        static constexpr T infinity() { return MK(BITS, INF); }                            \
        static constexpr T quiet_NaN() { return MK(BITS, NAN_); }                          \
        static constexpr T denorm_min() { return MK(BITS, DENORM); }                       \
    };
#define FF_MK_F32(B, V) __builtin_bit_cast(float, (B)(V))
#define FF_MK_F64(B, V) __builtin_bit_cast(double, (B)(V))
#define FF_MK_H(B, V) half(ff_bits_tag{}, (B)(V))
#define FF_MK_BF(B, V) bfloat(ff_bits_tag{}, (B)(V))
FF_FLOAT_LIMITS(float, FF_MK_F32, unsigned, 0x00800000u, 0x7f7fffffu, 0xff7fffffu, 0x34000000u,
                0x7f800000u, 0x7fc00000u, 0x00000001u)
FF_FLOAT_LIMITS(double, FF_MK_F64, unsigned long long, 0x0010000000000000ull,
                0x7fefffffffffffffull, 0xffefffffffffffffull, 0x3cb0000000000000ull,
                0x7ff0000000000000ull, 0x7ff8000000000000ull, 0x0000000000000001ull)
FF_FLOAT_LIMITS(half, FF_MK_H, unsigned short, 0x0400u, 0x7bffu, 0xfbffu, 0x1400u, 0x7c00u,
                0x7e00u, 0x0001u)
FF_FLOAT_LIMITS(bfloat, FF_MK_BF, unsigned short, 0x0080u, 0x7f7fu, 0xff7fu, 0x3c00u, 0x7f80u,
                0x7fc0u, 0x0001u)
#undef FF_FLOAT_LIMITS
#undef FF_MK_F32
#undef FF_MK_F64
#undef FF_MK_H
#undef FF_MK_BF

// ----- vectors ------------------------------------------------------------------------------

template <typename T, int N> struct vec;

template <typename V, typename R, int... I> struct ff_swizzle_ref;

// Members shared by every vector size: element access, swizzles (the translator rewrites
// `v.xy` into `v.template ff_swz<0, 1>()`, and into `ff_swz_ref` when it is assigned to) and
// element-wise operators as hidden friends, so scalars convert to the element type.
#define FF_VEC_COMMON(N)                                                                    \
    typedef T value_type;                                                                  \
    static constexpr int size = N;                                                         \
    __forceinline__ T& operator[](int i) { return (&x)[i]; }                               \
    __forceinline__ const T& operator[](int i) const { return (&x)[i]; }                   \
    template <int... I> __forceinline__ vec<T, sizeof...(I)> ff_swz() const {              \
        return vec<T, sizeof...(I)>((*this)[I]...);                                        \
    }                                                                                      \
    template <int... I>                                                                    \
    __forceinline__ ff_swizzle_ref<vec, vec<T, sizeof...(I)>, I...> ff_swz_ref() {        \
        return ff_swizzle_ref<vec, vec<T, sizeof...(I)>, I...>{*this};                     \
    }                                                                                      \
    FF_VEC_BINOP(+) FF_VEC_BINOP(-) FF_VEC_BINOP(*) FF_VEC_BINOP(/) FF_VEC_BINOP(%)        \
    FF_VEC_BINOP(&) FF_VEC_BINOP(|) FF_VEC_BINOP(^) FF_VEC_BINOP(<<) FF_VEC_BINOP(>>)      \
    FF_VEC_CMP(==) FF_VEC_CMP(!=) FF_VEC_CMP(<) FF_VEC_CMP(>) FF_VEC_CMP(<=) FF_VEC_CMP(>=) \
    FF_VEC_CMP(&&) FF_VEC_CMP(||)                                                          \
    FF_VEC_ASSIGN(+) FF_VEC_ASSIGN(-) FF_VEC_ASSIGN(*) FF_VEC_ASSIGN(/) FF_VEC_ASSIGN(%)   \
    FF_VEC_ASSIGN(&) FF_VEC_ASSIGN(|) FF_VEC_ASSIGN(^) FF_VEC_ASSIGN(<<) FF_VEC_ASSIGN(>>) \
    friend __forceinline__ vec operator-(vec a) {                                          \
        vec r;                                                                             \
        for (int i = 0; i < N; ++i) r[i] = T(-a[i]);                                       \
        return r;                                                                          \
    }                                                                                      \
    friend __forceinline__ vec operator+(vec a) { return a; }                              \
    friend __forceinline__ vec operator~(vec a) {                                          \
        vec r;                                                                             \
        for (int i = 0; i < N; ++i) r[i] = T(~a[i]);                                       \
        return r;                                                                          \
    }                                                                                      \
    friend __forceinline__ vec<bool, N> operator!(vec a) {                                 \
        vec<bool, N> r;                                                                    \
        for (int i = 0; i < N; ++i) r[i] = !a[i];                                          \
        return r;                                                                          \
    }

#define FF_VEC_BINOP(op)                                                                    \
    friend __forceinline__ vec operator op(vec a, vec b) {                                 \
        vec r;                                                                             \
        for (int i = 0; i < size; ++i) r[i] = T(a[i] op b[i]);                             \
        return r;                                                                          \
    }                                                                                      \
    friend __forceinline__ vec operator op(vec a, T s) {                                   \
        vec r;                                                                             \
        for (int i = 0; i < size; ++i) r[i] = T(a[i] op s);                                \
        return r;                                                                          \
    }                                                                                      \
    friend __forceinline__ vec operator op(T s, vec a) {                                   \
        vec r;                                                                             \
        for (int i = 0; i < size; ++i) r[i] = T(s op a[i]);                                \
        return r;                                                                          \
    }

#define FF_VEC_CMP(op)                                                                      \
    friend __forceinline__ vec<bool, size> operator op(vec a, vec b) {                     \
        vec<bool, size> r;                                                                 \
        for (int i = 0; i < size; ++i) r[i] = a[i] op b[i];                                \
        return r;                                                                          \
    }                                                                                      \
    friend __forceinline__ vec<bool, size> operator op(vec a, T s) {                       \
        vec<bool, size> r;                                                                 \
        for (int i = 0; i < size; ++i) r[i] = a[i] op s;                                   \
        return r;                                                                          \
    }                                                                                      \
    friend __forceinline__ vec<bool, size> operator op(T s, vec a) {                       \
        vec<bool, size> r;                                                                 \
        for (int i = 0; i < size; ++i) r[i] = s op a[i];                                   \
        return r;                                                                          \
    }

#define FF_VEC_ASSIGN(op)                                                                   \
    friend __forceinline__ vec& operator op##=(vec& a, vec b) {                            \
        for (int i = 0; i < size; ++i) a[i] = T(a[i] op b[i]);                             \
        return a;                                                                          \
    }                                                                                      \
    friend __forceinline__ vec& operator op##=(vec& a, T s) {                              \
        for (int i = 0; i < size; ++i) a[i] = T(a[i] op s);                                \
        return a;                                                                          \
    }

template <typename T> struct alignas(2 * sizeof(T)) vec<T, 2> {
    T x, y;
    vec() = default;
    constexpr vec(T s) : x(s), y(s) {}
    constexpr vec(T a, T b) : x(a), y(b) {}
    template <typename U> explicit constexpr vec(vec<U, 2> o) : x(T(o.x)), y(T(o.y)) {}
    FF_VEC_COMMON(2)
};

// Like Metal's, a 3-vector occupies (and is aligned to) four elements.
template <typename T> struct alignas(4 * sizeof(T)) vec<T, 3> {
    T x, y, z;
    vec() = default;
    constexpr vec(T s) : x(s), y(s), z(s) {}
    constexpr vec(T a, T b, T c) : x(a), y(b), z(c) {}
    constexpr vec(vec<T, 2> a, T c) : x(a.x), y(a.y), z(c) {}
    constexpr vec(T a, vec<T, 2> b) : x(a), y(b.x), z(b.y) {}
    template <typename U> explicit constexpr vec(vec<U, 3> o) : x(T(o.x)), y(T(o.y)), z(T(o.z)) {}
    FF_VEC_COMMON(3)
};

template <typename T> struct alignas(4 * sizeof(T)) vec<T, 4> {
    T x, y, z, w;
    vec() = default;
    constexpr vec(T s) : x(s), y(s), z(s), w(s) {}
    constexpr vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
    constexpr vec(vec<T, 2> a, T c, T d) : x(a.x), y(a.y), z(c), w(d) {}
    constexpr vec(T a, vec<T, 2> b, T d) : x(a), y(b.x), z(b.y), w(d) {}
    constexpr vec(T a, T b, vec<T, 2> c) : x(a), y(b), z(c.x), w(c.y) {}
    constexpr vec(vec<T, 2> a, vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
    constexpr vec(vec<T, 3> a, T d) : x(a.x), y(a.y), z(a.z), w(d) {}
    constexpr vec(T a, vec<T, 3> b) : x(a), y(b.x), z(b.y), w(b.z) {}
    template <typename U>
    explicit constexpr vec(vec<U, 4> o) : x(T(o.x)), y(T(o.y)), z(T(o.z)), w(T(o.w)) {}
    FF_VEC_COMMON(4)
};

#undef FF_VEC_COMMON
#undef FF_VEC_BINOP
#undef FF_VEC_CMP
#undef FF_VEC_ASSIGN

// A swizzle that is assigned to: writes go to the selected elements of the vector.
template <typename V, typename R, int... I> struct ff_swizzle_ref {
    V& v;
    __forceinline__ operator R() const { return R(v[I]...); }
    __forceinline__ ff_swizzle_ref& operator=(R r) {
        int k = 0;
        int idx[] = {I...};
        for (int i : idx) v[i] = r[k++];
        return *this;
    }
#define FF_SWZ_ASSIGN(op)                                                                   \
    __forceinline__ ff_swizzle_ref& operator op##=(R r) {                                  \
        return *this = R(*this) op r;                                                      \
    }
    FF_SWZ_ASSIGN(+) FF_SWZ_ASSIGN(-) FF_SWZ_ASSIGN(*) FF_SWZ_ASSIGN(/)
#undef FF_SWZ_ASSIGN
};

#define FF_VEC_TYPES(T, NAME)                                                               \
    typedef vec<T, 2> NAME##2;                                                             \
    typedef vec<T, 3> NAME##3;                                                             \
    typedef vec<T, 4> NAME##4;
FF_VEC_TYPES(float, float)
FF_VEC_TYPES(half, half)
FF_VEC_TYPES(bfloat, bfloat)
FF_VEC_TYPES(int, int)
FF_VEC_TYPES(uint, uint)
FF_VEC_TYPES(short, short)
FF_VEC_TYPES(ushort, ushort)
FF_VEC_TYPES(char, char)
FF_VEC_TYPES(uchar, uchar)
FF_VEC_TYPES(long, long)
FF_VEC_TYPES(ulong, ulong)
FF_VEC_TYPES(bool, bool)
#undef FF_VEC_TYPES

// ----- as_type ------------------------------------------------------------------------------

template <typename To, typename From> __forceinline__ To as_type(From f) {
    static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
    union {
        From from;
        To to;
    } u;
    u.from = f;
    return u.to;
}

// ----- math ---------------------------------------------------------------------------------
// float and double go to CUDA's own functions; half and bfloat compute in float and round
// once; vectors apply the scalar function per element.

#define FF_UNARY_16(F)                                                                      \
    __forceinline__ half F(half x) { return half(F((float)x)); }                           \
    __forceinline__ bfloat F(bfloat x) { return bfloat(F((float)x)); }                     \
    template <typename T, int N> __forceinline__ vec<T, N> F(vec<T, N> v) {                \
        vec<T, N> r;                                                                       \
        for (int i = 0; i < N; ++i) r[i] = F(v[i]);                                        \
        return r;                                                                          \
    }
#define FF_UNARY_CUDA(F)                                                                    \
    using ::F;                                                                             \
    FF_UNARY_16(F)
FF_UNARY_CUDA(exp)
FF_UNARY_CUDA(exp2)
FF_UNARY_CUDA(exp10)
FF_UNARY_CUDA(log)
FF_UNARY_CUDA(log2)
FF_UNARY_CUDA(log10)
FF_UNARY_CUDA(sqrt)
FF_UNARY_CUDA(rsqrt)
FF_UNARY_CUDA(cbrt)
FF_UNARY_CUDA(sin)
FF_UNARY_CUDA(cos)
FF_UNARY_CUDA(tan)
FF_UNARY_CUDA(asin)
FF_UNARY_CUDA(acos)
FF_UNARY_CUDA(atan)
FF_UNARY_CUDA(sinh)
FF_UNARY_CUDA(cosh)
FF_UNARY_CUDA(tanh)
FF_UNARY_CUDA(asinh)
FF_UNARY_CUDA(acosh)
FF_UNARY_CUDA(atanh)
FF_UNARY_CUDA(sinpi)
FF_UNARY_CUDA(cospi)
FF_UNARY_CUDA(fabs)
FF_UNARY_CUDA(floor)
FF_UNARY_CUDA(ceil)
FF_UNARY_CUDA(round)
FF_UNARY_CUDA(rint)
FF_UNARY_CUDA(trunc)
FF_UNARY_CUDA(erf)
FF_UNARY_CUDA(expm1)
FF_UNARY_CUDA(log1p)

using ::abs;
__forceinline__ half abs(half x) { return half(::fabsf((float)x)); }
__forceinline__ bfloat abs(bfloat x) { return bfloat(::fabsf((float)x)); }
template <typename T, int N> __forceinline__ vec<T, N> abs(vec<T, N> v) {
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r[i] = abs(v[i]);
    return r;
}

__forceinline__ float tanpi(float x) { return ::tanf(3.14159265358979323846f * x); }
__forceinline__ double tanpi(double x) { return ::tan(3.14159265358979323846 * x); }
__forceinline__ float fract(float x) { return ::fminf(x - ::floorf(x), 0x1.fffffep-1f); }
__forceinline__ double fract(double x) { return ::fmin(x - ::floor(x), 0x1.fffffffffffffp-1); }
__forceinline__ float saturate(float x) { return ::fminf(::fmaxf(x, 0.0f), 1.0f); }
__forceinline__ double saturate(double x) { return ::fmin(::fmax(x, 0.0), 1.0); }
__forceinline__ float sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? 0.0f * x : 0.0f)); }
__forceinline__ double sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : (x == x ? 0.0 * x : 0.0)); }
FF_UNARY_16(tanpi)
FF_UNARY_16(fract)
FF_UNARY_16(saturate)
FF_UNARY_16(sign)
#undef FF_UNARY_16
#undef FF_UNARY_CUDA

using ::isnan;
using ::isinf;
using ::isfinite;
using ::signbit;
__forceinline__ bool isnan(half x) { return ::isnan((float)x); }
__forceinline__ bool isnan(bfloat x) { return ::isnan((float)x); }
__forceinline__ bool isinf(half x) { return ::isinf((float)x); }
__forceinline__ bool isinf(bfloat x) { return ::isinf((float)x); }
__forceinline__ bool isfinite(half x) { return ::isfinite((float)x); }
__forceinline__ bool isfinite(bfloat x) { return ::isfinite((float)x); }
__forceinline__ bool signbit(half x) { return (x.bits & 0x8000u) != 0; }
__forceinline__ bool signbit(bfloat x) { return (x.bits & 0x8000u) != 0; }
#define FF_PRED_VEC(F)                                                                      \
    template <typename T, int N> __forceinline__ vec<bool, N> F(vec<T, N> v) {             \
        vec<bool, N> r;                                                                    \
        for (int i = 0; i < N; ++i) r[i] = F(v[i]);                                        \
        return r;                                                                          \
    }
FF_PRED_VEC(isnan)
FF_PRED_VEC(isinf)
FF_PRED_VEC(isfinite)
FF_PRED_VEC(signbit)
#undef FF_PRED_VEC

// Two-argument functions: CUDA's for float/double, float math for the 16-bit types (also
// when mixed with a scalar of another type), element-wise for vectors.
#define FF_BINARY(F, CUDA_F)                                                                \
    using ::CUDA_F;                                                                        \
    __forceinline__ half F(half a, half b) { return half(::CUDA_F((float)a, (float)b)); }  \
    __forceinline__ bfloat F(bfloat a, bfloat b) {                                         \
        return bfloat(::CUDA_F((float)a, (float)b));                                       \
    }                                                                                      \
    template <typename T, int N> __forceinline__ vec<T, N> F(vec<T, N> a, vec<T, N> b) {   \
        vec<T, N> r;                                                                       \
        for (int i = 0; i < N; ++i) r[i] = F(a[i], b[i]);                                  \
        return r;                                                                          \
    }                                                                                      \
    template <typename T, int N> __forceinline__ vec<T, N> F(vec<T, N> a, T b) {           \
        vec<T, N> r;                                                                       \
        for (int i = 0; i < N; ++i) r[i] = F(a[i], b);                                     \
        return r;                                                                          \
    }
FF_BINARY(pow, pow)
FF_BINARY(atan2, atan2)
FF_BINARY(fmod, fmod)
FF_BINARY(fmin, fmin)
FF_BINARY(fmax, fmax)
FF_BINARY(copysign, copysign)
#undef FF_BINARY

__forceinline__ float powr(float a, float b) { return ::powf(a, b); }
__forceinline__ half powr(half a, half b) { return half(::powf((float)a, (float)b)); }
__forceinline__ float ldexp(float a, int e) { return ::ldexpf(a, e); }
__forceinline__ float divide(float a, float b) { return a / b; }

// min/max/clamp: CUDA's overloads for built-in scalars, exact ones for 16-bit types and
// vectors. Metal's fmin/fmax/min/max on floats return the other operand for one NaN.
using ::min;
using ::max;
__forceinline__ half min(half a, half b) { return half(::fminf((float)a, (float)b)); }
__forceinline__ half max(half a, half b) { return half(::fmaxf((float)a, (float)b)); }
__forceinline__ bfloat min(bfloat a, bfloat b) { return bfloat(::fminf((float)a, (float)b)); }
__forceinline__ bfloat max(bfloat a, bfloat b) { return bfloat(::fmaxf((float)a, (float)b)); }
__forceinline__ short min(short a, short b) { return a < b ? a : b; }
__forceinline__ short max(short a, short b) { return a > b ? a : b; }
__forceinline__ ushort min(ushort a, ushort b) { return a < b ? a : b; }
__forceinline__ ushort max(ushort a, ushort b) { return a > b ? a : b; }
__forceinline__ char min(char a, char b) { return a < b ? a : b; }
__forceinline__ char max(char a, char b) { return a > b ? a : b; }
__forceinline__ uchar min(uchar a, uchar b) { return a < b ? a : b; }
__forceinline__ uchar max(uchar a, uchar b) { return a > b ? a : b; }
template <typename T, int N> __forceinline__ vec<T, N> min(vec<T, N> a, vec<T, N> b) {
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r[i] = min(a[i], b[i]);
    return r;
}
template <typename T, int N> __forceinline__ vec<T, N> max(vec<T, N> a, vec<T, N> b) {
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r[i] = max(a[i], b[i]);
    return r;
}
template <typename T, int N> __forceinline__ vec<T, N> min(vec<T, N> a, T b) {
    return min(a, vec<T, N>(b));
}
template <typename T, int N> __forceinline__ vec<T, N> max(vec<T, N> a, T b) {
    return max(a, vec<T, N>(b));
}
template <typename T> __forceinline__ T min3(T a, T b, T c) { return min(min(a, b), c); }
template <typename T> __forceinline__ T max3(T a, T b, T c) { return max(max(a, b), c); }
template <typename T> __forceinline__ T median3(T a, T b, T c) {
    return max(min(a, b), min(max(a, b), c));
}
template <typename T> __forceinline__ T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T, int N> __forceinline__ vec<T, N> clamp(vec<T, N> x, T lo, T hi) {
    return min(max(x, vec<T, N>(lo)), vec<T, N>(hi));
}

using ::fma;
__forceinline__ half fma(half a, half b, half c) {
    return half(::fmaf((float)a, (float)b, (float)c));
}
__forceinline__ bfloat fma(bfloat a, bfloat b, bfloat c) {
    return bfloat(::fmaf((float)a, (float)b, (float)c));
}
template <typename T, int N>
__forceinline__ vec<T, N> fma(vec<T, N> a, vec<T, N> b, vec<T, N> c) {
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r[i] = fma(a[i], b[i], c[i]);
    return r;
}

// mix(x, y, a) = x + (y - x) * a
template <typename T> __forceinline__ T mix(T x, T y, T a) { return x + (y - x) * a; }
template <typename T, int N> __forceinline__ vec<T, N> mix(vec<T, N> x, vec<T, N> y, T a) {
    return x + (y - x) * a;
}
template <typename T> __forceinline__ T step(T edge, T x) { return x < edge ? T(0) : T(1); }
template <typename T> __forceinline__ T smoothstep(T e0, T e1, T x) {
    T t = clamp(T((x - e0) / (e1 - e0)), T(0), T(1));
    return t * t * (T(3) - T(2) * t);
}

// select(a, b, c) = c ? b : a
template <typename T> __forceinline__ T select(T a, T b, bool c) { return c ? b : a; }
template <typename T, int N>
__forceinline__ vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) {
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
    return r;
}

template <int N> __forceinline__ bool all(vec<bool, N> v) {
    bool r = true;
    for (int i = 0; i < N; ++i) r = r && v[i];
    return r;
}
template <int N> __forceinline__ bool any(vec<bool, N> v) {
    bool r = false;
    for (int i = 0; i < N; ++i) r = r || v[i];
    return r;
}
__forceinline__ bool all(bool v) { return v; }
__forceinline__ bool any(bool v) { return v; }

template <typename T, int N> __forceinline__ T dot(vec<T, N> a, vec<T, N> b) {
    T r = a[0] * b[0];
    for (int i = 1; i < N; ++i) r += a[i] * b[i];
    return r;
}
template <typename T, int N> __forceinline__ T length_squared(vec<T, N> a) { return dot(a, a); }
template <typename T, int N> __forceinline__ T length(vec<T, N> a) { return sqrt(dot(a, a)); }
template <typename T, int N> __forceinline__ T distance(vec<T, N> a, vec<T, N> b) {
    return length(a - b);
}
template <typename T, int N> __forceinline__ vec<T, N> normalize(vec<T, N> a) {
    return a * rsqrt(dot(a, a));
}
template <typename T> __forceinline__ vec<T, 3> cross(vec<T, 3> a, vec<T, 3> b) {
    return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

template <typename T> __forceinline__ T sincos(T x, T& c) {
    c = cos(x);
    return sin(x);
}

__forceinline__ uint popcount(uint x) { return (uint)__popc(x); }
__forceinline__ int popcount(int x) { return __popc((uint)x); }
__forceinline__ ulong popcount(ulong x) { return (ulong)__popcll(x); }
__forceinline__ uint clz(uint x) { return (uint)__clz((int)x); }
__forceinline__ int clz(int x) { return __clz(x); }
__forceinline__ uint ctz(uint x) { return x == 0 ? 32u : (uint)(__ffs((int)x) - 1); }
__forceinline__ int ctz(int x) { return x == 0 ? 32 : __ffs(x) - 1; }
__forceinline__ uint reverse_bits(uint x) { return __brev(x); }
__forceinline__ int mulhi(int a, int b) { return __mulhi(a, b); }
__forceinline__ uint mulhi(uint a, uint b) { return __umulhi(a, b); }

// metal::precise:: is the default (accurate) math; metal::fast:: uses the hardware
// approximations for float.
namespace precise {
using metal::acos;
using metal::acosh;
using metal::asin;
using metal::asinh;
using metal::atan;
using metal::atan2;
using metal::atanh;
using metal::cos;
using metal::cosh;
using metal::cospi;
using metal::divide;
using metal::exp;
using metal::exp10;
using metal::exp2;
using metal::fabs;
using metal::fmax;
using metal::fmin;
using metal::log;
using metal::log10;
using metal::log2;
using metal::pow;
using metal::powr;
using metal::rsqrt;
using metal::sin;
using metal::sincos;
using metal::sinh;
using metal::sinpi;
using metal::sqrt;
using metal::tan;
using metal::tanh;
using metal::tanpi;
using metal::abs;
using metal::max;
using metal::min;
using metal::clamp;
using metal::floor;
using metal::ceil;
using metal::round;
using metal::trunc;
using metal::fract;
using metal::normalize;
using metal::length;
using metal::distance;
} // namespace precise

namespace fast {
using namespace metal::precise;
__forceinline__ float exp(float x) { return __expf(x); }
__forceinline__ float exp2(float x) { return ::exp2f(x); }
__forceinline__ float exp10(float x) { return __exp10f(x); }
__forceinline__ float log(float x) { return __logf(x); }
__forceinline__ float log2(float x) { return __log2f(x); }
__forceinline__ float log10(float x) { return __log10f(x); }
__forceinline__ float sin(float x) { return __sinf(x); }
__forceinline__ float cos(float x) { return __cosf(x); }
__forceinline__ float tan(float x) { return __tanf(x); }
__forceinline__ float pow(float a, float b) { return __powf(a, b); }
__forceinline__ float powr(float a, float b) { return __powf(a, b); }
__forceinline__ float divide(float a, float b) { return __fdividef(a, b); }
__forceinline__ float rsqrt(float x) { return ::rsqrtf(x); }
__forceinline__ float tanh(float x) {
    float e = __expf(-2.0f * ::fabsf(x));
    return ::copysignf((1.0f - e) / (1.0f + e), x);
}
} // namespace fast

// ----- threads, barriers, SIMD groups -------------------------------------------------------

enum class mem_flags : unsigned {
    mem_none = 0,
    mem_device = 1,
    mem_threadgroup = 2,
    mem_texture = 4,
    mem_threadgroup_imageblock = 8,
    mem_object_data = 16,
};
__forceinline__ constexpr mem_flags operator|(mem_flags a, mem_flags b) {
    return (mem_flags)((unsigned)a | (unsigned)b);
}
__forceinline__ constexpr bool ff_has(mem_flags a, mem_flags b) {
    return ((unsigned)a & (unsigned)b) != 0;
}

// Which lanes of each warp run the kernel body (threads past the grid do not), written by
// the entry kernel before the body starts.
__shared__ uint ff_warp_masks[32];

__forceinline__ uint ff_thread_index() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__forceinline__ uint ff_lane() { return ff_thread_index() & 31u; }
__forceinline__ uint ff_warp_mask() { return ff_warp_masks[ff_thread_index() >> 5]; }

// The block barrier with an OR reduction, in its non-aligned form: threads of one warp may
// reach it from different places (`__syncthreads_or` is the aligned form, which requires the
// whole warp at the same instruction and hangs otherwise).
__forceinline__ bool ff_barrier_or(bool pred) {
    unsigned r;
    asm volatile("{\n\t.reg .pred p, q;\n\tsetp.ne.u32 p, %1, 0;\n\t"
                 "barrier.red.or.pred q, 0, p;\n\tselp.u32 %0, 1, 0, q;\n\t}"
                 : "=r"(r)
                 : "r"((unsigned)pred)
                 : "memory");
    return r != 0;
}

// A barrier reduction rather than a plain barrier: threads past the grid (and threads whose
// body has returned) wait in the entry kernel in a loop of the same barrier with predicate
// false, until every thread of the block is there. So barriers work in partial threadgroups.
__forceinline__ void threadgroup_barrier(mem_flags flags = mem_flags::mem_none) {
    if (ff_has(flags, mem_flags::mem_device)) {
        __threadfence();
    }
    (void)ff_barrier_or(true);
}
__forceinline__ void simdgroup_barrier(mem_flags flags = mem_flags::mem_none) {
    if (ff_has(flags, mem_flags::mem_device)) {
        __threadfence();
    }
    __syncwarp(ff_warp_mask());
}

// Shuffles move 32-bit words; wider and narrower types travel as words.
template <typename T> struct ff_shfl {
    static constexpr int words = (int)((sizeof(T) + 3) / 4);
    union U {
        T v;
        uint w[words];
    };
    template <typename Op> __forceinline__ static T apply(T v, Op op) {
        U in;
        for (int i = 0; i < words; ++i) in.w[i] = 0;
        in.v = v;
        U out;
        for (int i = 0; i < words; ++i) out.w[i] = op(in.w[i]);
        return out.v;
    }
};

template <typename T> __forceinline__ T ff_shfl_idx(T v, uint src, uint mask, int width = 32) {
    return ff_shfl<T>::apply(v, [=](uint w) { return __shfl_sync(mask, w, (int)src, width); });
}
template <typename T> __forceinline__ T ff_shfl_xor(T v, uint m, uint mask, int width = 32) {
    return ff_shfl<T>::apply(v, [=](uint w) { return __shfl_xor_sync(mask, w, (int)m, width); });
}
template <typename T> __forceinline__ T ff_shfl_up(T v, uint d, uint mask, int width = 32) {
    return ff_shfl<T>::apply(v, [=](uint w) { return __shfl_up_sync(mask, w, d, width); });
}
template <typename T> __forceinline__ T ff_shfl_down(T v, uint d, uint mask, int width = 32) {
    return ff_shfl<T>::apply(v, [=](uint w) { return __shfl_down_sync(mask, w, d, width); });
}

template <typename T> __forceinline__ T simd_shuffle(T v, ushort lane) {
    return ff_shfl_idx(v, lane, ff_warp_mask());
}
template <typename T> __forceinline__ T simd_broadcast(T v, ushort lane) {
    return ff_shfl_idx(v, lane, ff_warp_mask());
}
template <typename T> __forceinline__ T simd_shuffle_xor(T v, ushort m) {
    return ff_shfl_xor(v, m, ff_warp_mask());
}
template <typename T> __forceinline__ T simd_shuffle_up(T v, ushort d) {
    return ff_shfl_up(v, d, ff_warp_mask());
}
template <typename T> __forceinline__ T simd_shuffle_down(T v, ushort d) {
    return ff_shfl_down(v, d, ff_warp_mask());
}
template <typename T> __forceinline__ T simd_shuffle_rotate_up(T v, ushort d) {
    return ff_shfl_idx(v, (ff_lane() - d) & 31u, ff_warp_mask());
}
template <typename T> __forceinline__ T simd_shuffle_rotate_down(T v, ushort d) {
    return ff_shfl_idx(v, (ff_lane() + d) & 31u, ff_warp_mask());
}
template <typename T> __forceinline__ T simd_shuffle_and_fill_up(T v, T fill, ushort d) {
    uint mask = ff_warp_mask();
    uint lane = ff_lane();
    T a = ff_shfl_idx(v, (lane - d) & 31u, mask);
    T b = ff_shfl_idx(fill, (lane - d) & 31u, mask);
    return lane >= d ? a : b;
}
template <typename T> __forceinline__ T simd_shuffle_and_fill_down(T v, T fill, ushort d) {
    uint mask = ff_warp_mask();
    uint lane = ff_lane();
    T a = ff_shfl_idx(v, (lane + d) & 31u, mask);
    T b = ff_shfl_idx(fill, (lane + d) & 31u, mask);
    return lane + d < 32u ? a : b;
}
template <typename T> __forceinline__ T simd_broadcast_first(T v) {
    uint active = __activemask();
    return ff_shfl_idx(v, (uint)(__ffs((int)active) - 1), active);
}
__forceinline__ bool simd_is_first() {
    return ff_lane() == (uint)(__ffs((int)__activemask()) - 1);
}
__forceinline__ bool simd_any(bool p) { return __any_sync(ff_warp_mask(), p) != 0; }
__forceinline__ bool simd_all(bool p) { return __all_sync(ff_warp_mask(), p) != 0; }

struct simd_vote {
    typedef ulong vote_t;
    ulong v;
    __forceinline__ explicit operator ulong() const { return v; }
    __forceinline__ explicit operator bool() const { return v != 0; }
    __forceinline__ bool all() const { return v == (ulong)ff_warp_mask(); }
    __forceinline__ bool any() const { return v != 0; }
};
__forceinline__ simd_vote simd_ballot(bool p) {
    return simd_vote{(ulong)__ballot_sync(ff_warp_mask(), p)};
}
__forceinline__ simd_vote simd_active_threads_mask() {
    return simd_vote{(ulong)__activemask()};
}

// Reductions over the lanes that run the body: a butterfly for full warps; otherwise every
// lane folds the values of the lanes in the mask in lane order (only partial warps pay).
template <typename T, typename Op> __forceinline__ T ff_simd_reduce(T v, Op op, int width) {
    uint mask = ff_warp_mask();
    if (mask == 0xffffffffu) {
        for (int off = width / 2; off > 0; off >>= 1) {
            v = op(v, ff_shfl_xor(v, (uint)off, mask, width));
        }
        return v;
    }
    uint base = ff_lane() & ~(uint)(width - 1);
    uint group = (width == 32 ? 0xffffffffu : ((1u << width) - 1u) << base) & mask;
    T acc = v;
    bool first = true;
    for (uint rest = mask; rest != 0; rest &= rest - 1) {
        uint src = (uint)(__ffs((int)rest) - 1);
        T x = ff_shfl_idx(v, src, mask);
        if ((group >> src) & 1u) {
            acc = first ? x : op(acc, x);
            first = false;
        }
    }
    return acc;
}

#define FF_SIMD_REDUCTION(NAME, QNAME, EXPR)                                                \
    template <typename T> __forceinline__ T NAME(T v) {                                    \
        return ff_simd_reduce(v, [](T a, T b) { return EXPR; }, 32);                       \
    }                                                                                      \
    template <typename T> __forceinline__ T QNAME(T v) {                                   \
        return ff_simd_reduce(v, [](T a, T b) { return EXPR; }, 4);                        \
    }
FF_SIMD_REDUCTION(simd_sum, quad_sum, T(a + b))
FF_SIMD_REDUCTION(simd_product, quad_product, T(a * b))
FF_SIMD_REDUCTION(simd_max, quad_max, max(a, b))
FF_SIMD_REDUCTION(simd_min, quad_min, min(a, b))
FF_SIMD_REDUCTION(simd_and, quad_and, T(a & b))
FF_SIMD_REDUCTION(simd_or, quad_or, T(a | b))
FF_SIMD_REDUCTION(simd_xor, quad_xor, T(a ^ b))
#undef FF_SIMD_REDUCTION

// Inclusive scans (Hillis-Steele over shfl_up); exclusive scans shift the inclusive result
// up by one lane and put the identity in lane 0.
template <typename T> __forceinline__ T simd_prefix_inclusive_sum(T v) {
    uint mask = ff_warp_mask();
    uint lane = ff_lane();
    for (uint off = 1; off < 32u; off <<= 1) {
        T t = ff_shfl_up(v, off, mask);
        if (lane >= off) v = T(v + t);
    }
    return v;
}
template <typename T> __forceinline__ T simd_prefix_inclusive_product(T v) {
    uint mask = ff_warp_mask();
    uint lane = ff_lane();
    for (uint off = 1; off < 32u; off <<= 1) {
        T t = ff_shfl_up(v, off, mask);
        if (lane >= off) v = T(v * t);
    }
    return v;
}
template <typename T> __forceinline__ T simd_prefix_exclusive_sum(T v) {
    T inc = simd_prefix_inclusive_sum(v);
    T up = ff_shfl_up(inc, 1u, ff_warp_mask());
    return ff_lane() == 0 ? T(0) : up;
}
template <typename T> __forceinline__ T simd_prefix_exclusive_product(T v) {
    T inc = simd_prefix_inclusive_product(v);
    T up = ff_shfl_up(inc, 1u, ff_warp_mask());
    return ff_lane() == 0 ? T(1) : up;
}

template <typename T> __forceinline__ T quad_shuffle(T v, ushort lane) {
    return ff_shfl_idx(v, lane, ff_warp_mask(), 4);
}
template <typename T> __forceinline__ T quad_broadcast(T v, ushort lane) {
    return ff_shfl_idx(v, lane, ff_warp_mask(), 4);
}
template <typename T> __forceinline__ T quad_shuffle_xor(T v, ushort m) {
    return ff_shfl_xor(v, m, ff_warp_mask(), 4);
}
template <typename T> __forceinline__ T quad_shuffle_up(T v, ushort d) {
    return ff_shfl_up(v, d, ff_warp_mask(), 4);
}
template <typename T> __forceinline__ T quad_shuffle_down(T v, ushort d) {
    return ff_shfl_down(v, d, ff_warp_mask(), 4);
}

// ----- atomics ------------------------------------------------------------------------------
// Metal's atomic<T> over device or threadgroup memory. Memory orders other than relaxed add
// a fence on the side they order.

enum memory_order {
    memory_order_relaxed,
    memory_order_acquire,
    memory_order_release,
    memory_order_acq_rel,
    memory_order_seq_cst,
};

template <typename T> struct atomic {
    T ff_value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;

__forceinline__ void ff_fence_before(memory_order mo) {
    if (mo == memory_order_release || mo == memory_order_acq_rel || mo == memory_order_seq_cst) {
        __threadfence();
    }
}
__forceinline__ void ff_fence_after(memory_order mo) {
    if (mo == memory_order_acquire || mo == memory_order_acq_rel || mo == memory_order_seq_cst) {
        __threadfence();
    }
}

// Read-modify-write by compare-and-swap on the aligned 32- or 64-bit word holding the value,
// for the operations CUDA has no instruction for.
template <typename T, typename Op> __forceinline__ T ff_atomic_rmw(T* p, Op op) {
    static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8,
                  "atomic types are 1, 2, 4 or 8 bytes");
    if constexpr (sizeof(T) == 8) {
        unsigned long long* w = (unsigned long long*)p;
        unsigned long long old = *(volatile unsigned long long*)w, assumed;
        do {
            assumed = old;
            T next = op(as_type<T>(assumed));
            old = atomicCAS(w, assumed, as_type<unsigned long long>(next));
        } while (old != assumed);
        return as_type<T>(old);
    } else {
        unsigned long long addr = (unsigned long long)p;
        unsigned* w = (unsigned*)(addr & ~3ull);
        unsigned shift = (unsigned)(addr & 3ull) * 8u;
        unsigned field = sizeof(T) == 4 ? 0xffffffffu : ((1u << (8u * sizeof(T))) - 1u);
        unsigned old = *(volatile unsigned*)w, assumed;
        T prev;
        do {
            assumed = old;
            union {
                unsigned u;
                T t;
            } cur, next;
            cur.u = (assumed >> shift) & field;
            prev = cur.t;
            next.u = 0;
            next.t = op(cur.t);
            unsigned merged = (assumed & ~(field << shift)) | ((next.u & field) << shift);
            old = atomicCAS(w, assumed, merged);
        } while (old != assumed);
        return prev;
    }
}

template <typename T> __forceinline__ T ff_atomic_add(T* p, T v) {
    if constexpr (is_same<T, float>::value || is_same<T, int>::value ||
                  is_same<T, uint>::value || is_same<T, unsigned long long>::value ||
                  is_same<T, double>::value) {
        return atomicAdd(p, v);
    } else if constexpr (is_same<T, ulong>::value || is_same<T, long long>::value ||
                         is_same<T, long>::value) {
        return (T)atomicAdd((unsigned long long*)p, (unsigned long long)v);
    } else {
        return ff_atomic_rmw(p, [=](T a) { return T(a + v); });
    }
}
template <typename T> __forceinline__ T ff_atomic_exch(T* p, T v) {
    if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
        if constexpr (sizeof(T) == 4) {
            return as_type<T>(atomicExch((unsigned*)p, as_type<unsigned>(v)));
        } else {
            return as_type<T>(atomicExch((unsigned long long*)p, as_type<unsigned long long>(v)));
        }
    } else {
        return ff_atomic_rmw(p, [=](T) { return v; });
    }
}

#define FF_ATOMIC_INT_OP(NAME, CUDA_OP, EXPR)                                               \
    template <typename T> __forceinline__ T ff_atomic_##NAME(T* p, T v) {                  \
        if constexpr (is_same<T, int>::value || is_same<T, uint>::value ||                 \
                      is_same<T, unsigned long long>::value) {                             \
            return CUDA_OP(p, v);                                                          \
        } else if constexpr (is_same<T, ulong>::value) {                                   \
            return (T)CUDA_OP((unsigned long long*)p, (unsigned long long)v);              \
        } else {                                                                           \
            return ff_atomic_rmw(p, [=](T a) { return T(EXPR); });                         \
        }                                                                                  \
    }
FF_ATOMIC_INT_OP(and, atomicAnd, a & v)
FF_ATOMIC_INT_OP(or, atomicOr, a | v)
FF_ATOMIC_INT_OP(xor, atomicXor, a ^ v)
FF_ATOMIC_INT_OP(min, atomicMin, v < a ? v : a)
FF_ATOMIC_INT_OP(max, atomicMax, v > a ? v : a)
#undef FF_ATOMIC_INT_OP

template <typename T, typename U>
__forceinline__ T atomic_fetch_add_explicit(atomic<T>* o, U v, memory_order mo) {
    ff_fence_before(mo);
    T r = ff_atomic_add(&o->ff_value, T(v));
    ff_fence_after(mo);
    return r;
}
template <typename T, typename U>
__forceinline__ T atomic_fetch_sub_explicit(atomic<T>* o, U v, memory_order mo) {
    ff_fence_before(mo);
    T r;
    if constexpr (is_floating_point<T>::value) {
        r = ff_atomic_add(&o->ff_value, T(-T(v)));
    } else {
        r = ff_atomic_add(&o->ff_value, T(T(0) - T(v)));
    }
    ff_fence_after(mo);
    return r;
}
#define FF_ATOMIC_FETCH(NAME)                                                               \
    template <typename T, typename U>                                                      \
    __forceinline__ T atomic_fetch_##NAME##_explicit(atomic<T>* o, U v, memory_order mo) { \
        ff_fence_before(mo);                                                               \
        T r = ff_atomic_##NAME(&o->ff_value, T(v));                                        \
        ff_fence_after(mo);                                                                \
        return r;                                                                          \
    }
FF_ATOMIC_FETCH(and)
FF_ATOMIC_FETCH(or)
FF_ATOMIC_FETCH(xor)
FF_ATOMIC_FETCH(min)
FF_ATOMIC_FETCH(max)
#undef FF_ATOMIC_FETCH

template <typename T, typename U>
__forceinline__ T atomic_exchange_explicit(atomic<T>* o, U v, memory_order mo) {
    ff_fence_before(mo);
    T r = ff_atomic_exch(&o->ff_value, T(v));
    ff_fence_after(mo);
    return r;
}
template <typename T, typename U>
__forceinline__ void atomic_store_explicit(atomic<T>* o, U v, memory_order mo) {
    ff_fence_before(mo);
    *(volatile T*)&o->ff_value = T(v);
    ff_fence_after(mo);
}
template <typename T> __forceinline__ T atomic_load_explicit(atomic<T>* o, memory_order mo) {
    ff_fence_before(mo);
    T r = *(volatile T*)&o->ff_value;
    ff_fence_after(mo);
    return r;
}
// Compares bit patterns, as Metal does; on failure the current value goes to *expected.
template <typename T, typename U>
__forceinline__ bool atomic_compare_exchange_weak_explicit(atomic<T>* o, T* expected, U desired,
                                                           memory_order success,
                                                           memory_order failure) {
    ff_fence_before(success);
    T want = *expected;
    T next = T(desired);
    T seen;
    if constexpr (sizeof(T) == 4) {
        seen = as_type<T>(atomicCAS((unsigned*)&o->ff_value, as_type<unsigned>(want),
                                    as_type<unsigned>(next)));
    } else if constexpr (sizeof(T) == 8) {
        seen = as_type<T>(atomicCAS((unsigned long long*)&o->ff_value,
                                    as_type<unsigned long long>(want),
                                    as_type<unsigned long long>(next)));
    } else {
        bool swapped = false;
        seen = ff_atomic_rmw(&o->ff_value, [&](T cur) {
            swapped = as_type<ushort>(cur) == as_type<ushort>(want);
            return swapped ? next : cur;
        });
    }
    bool ok;
    if constexpr (sizeof(T) == 4) {
        ok = as_type<unsigned>(seen) == as_type<unsigned>(want);
    } else if constexpr (sizeof(T) == 8) {
        ok = as_type<unsigned long long>(seen) == as_type<unsigned long long>(want);
    } else {
        ok = as_type<ushort>(seen) == as_type<ushort>(want);
    }
    if (!ok) {
        *expected = seen;
    }
    ff_fence_after(ok ? success : failure);
    return ok;
}
template <typename T, typename U>
__forceinline__ bool atomic_compare_exchange_strong_explicit(atomic<T>* o, T* expected,
                                                             U desired, memory_order success,
                                                             memory_order failure) {
    return atomic_compare_exchange_weak_explicit(o, expected, desired, success, failure);
}

} // namespace metal

using namespace metal;

// ----- MLX's Metal kernel utilities (mlx/backend/metal/kernels/utils.h) ---------------------

template <typename U> struct Limits {
    static constexpr U max = metal::numeric_limits<U>::max();
    static constexpr U min = metal::numeric_limits<U>::min();
    static constexpr U finite_max = metal::numeric_limits<U>::max();
    static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define FF_FLOAT_LIMIT(T)                                                                   \
    template <> struct Limits<T> {                                                         \
        static constexpr T max = metal::numeric_limits<T>::infinity();                     \
        static constexpr T min = ff_negate(metal::numeric_limits<T>::infinity());          \
        static constexpr T finite_max = metal::numeric_limits<T>::max();                   \
        static constexpr T finite_min = metal::numeric_limits<T>::lowest();                \
    };
constexpr float ff_negate(float x) { return -x; }
constexpr double ff_negate(double x) { return -x; }
constexpr half ff_negate(half x) { return half(ff_bits_tag{}, (unsigned short)(x.bits ^ 0x8000u)); }
constexpr bfloat ff_negate(bfloat x) {
    return bfloat(ff_bits_tag{}, (unsigned short)(x.bits ^ 0x8000u));
}
FF_FLOAT_LIMIT(float)
FF_FLOAT_LIMIT(double)
FF_FLOAT_LIMIT(half)
FF_FLOAT_LIMIT(bfloat)
#undef FF_FLOAT_LIMIT
template <> struct Limits<bool> {
    static constexpr bool max = true;
    static constexpr bool min = false;
};

// Location of element `elem` of a row-major index space in a strided array.
template <typename IdxT = int64_t>
__forceinline__ IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
    int64_t loc = 0;
    int64_t e = (int64_t)elem;
    for (int i = ndim - 1; i >= 0 && e > 0; --i) {
        loc += (e % shape[i]) * strides[i];
        e /= shape[i];
    }
    return (IdxT)loc;
}

template <typename IdxT = int64_t>
__forceinline__ IdxT elem_to_loc(metal::uint3 elem, const int* shape, const int64_t* strides, int ndim) {
    int64_t loc = (int64_t)elem.x * strides[ndim - 1];
    if (ndim > 1) {
        loc += (int64_t)elem.y * strides[ndim - 2];
    }
    int64_t z = elem.z;
    for (int d = ndim - 3; d >= 0; --d) {
        loc += (z % shape[d]) * strides[d];
        z /= shape[d];
    }
    return (IdxT)loc;
}

template <typename IdxT = int64_t>
__forceinline__ IdxT elem_to_loc_1(uint elem, int64_t stride) {
    return (IdxT)(elem * stride);
}
template <typename IdxT = int64_t>
__forceinline__ IdxT elem_to_loc_2(metal::uint2 elem, const int64_t* strides) {
    return (IdxT)(elem.x * strides[1] + elem.y * strides[0]);
}
template <typename IdxT = int64_t>
__forceinline__ IdxT elem_to_loc_3(metal::uint3 elem, const int64_t* strides) {
    return (IdxT)(elem.x * strides[2] + elem.y * strides[1] + elem.z * strides[0]);
}

template <typename T, typename U> __forceinline__ T ceildiv(T n, U m) {
    return (T)((n + m - 1) / m);
}

// ----- dispatch -----------------------------------------------------------------------------

struct ff_grid3 {
    uint v[3];
};

template <int N> struct ff_dims {
    int v[N];
};
template <int N> struct ff_strides {
    int64_t v[N];
};

// Metal's thread-position attributes of this thread, from CUDA's indices, the grid in
// threads, the dispatch's threadgroup size `tg` (clamped to the grid) and the index of the
// launch's first block `origin`. A block is one threadgroup; the last threadgroups along an
// axis are smaller (Metal's non-uniform threadgroups) and are launched as blocks of their
// real size (the host splits the grid into launches of full and of partial blocks), so
// `threads_per_threadgroup` is the block's size and every thread is in the grid (`in_grid`
// guards a block launched full-sized past the grid all the same). SIMD lanes are the
// hardware's: the thread's index in its block, `thread_index_in_threadgroup`, modulo 32.
struct ff_thread_info {
    bool in_grid;
    metal::uint3 thread_position_in_grid;
    metal::uint3 threads_per_grid;
    metal::uint3 grid_size;
    metal::uint3 grid_origin;
    metal::uint3 threadgroup_position_in_grid;
    metal::uint3 threadgroups_per_grid;
    metal::uint3 thread_position_in_threadgroup;
    metal::uint3 threads_per_threadgroup;
    metal::uint3 dispatch_threads_per_threadgroup;
    uint thread_index_in_threadgroup;
    uint thread_index_in_simdgroup;
    uint simdgroup_index_in_threadgroup;
    uint simdgroups_per_threadgroup;
    uint dispatch_simdgroups_per_threadgroup;
    uint threads_per_simdgroup;
    uint thread_execution_width;
    uint thread_index_in_quadgroup;
    uint quadgroup_index_in_threadgroup;
    uint quadgroups_per_threadgroup;
    uint dispatch_quadgroups_per_threadgroup;

    // Fills the attributes and publishes which lanes of each warp run the body. Every thread
    // of the block calls it, before any thread runs the body.
    __forceinline__ static ff_thread_info make(ff_grid3 grid, ff_grid3 tg, ff_grid3 origin) {
        ff_thread_info t;
        uint g[3] = {grid.v[0], grid.v[1], grid.v[2]};
        uint b[3] = {tg.v[0], tg.v[1], tg.v[2]};
        uint bi[3] = {blockIdx.x + origin.v[0], blockIdx.y + origin.v[1],
                      blockIdx.z + origin.v[2]};
        uint ti[3] = {threadIdx.x, threadIdx.y, threadIdx.z};
        uint pos[3];
        uint real[3];
        t.in_grid = true;
        for (int a = 0; a < 3; ++a) {
            uint first = bi[a] * b[a];
            pos[a] = first + ti[a];
            uint left = g[a] - first;
            real[a] = left < b[a] ? left : b[a];
            t.in_grid = t.in_grid && pos[a] < g[a];
        }
        t.thread_position_in_grid = metal::uint3(pos[0], pos[1], pos[2]);
        t.threads_per_grid = metal::uint3(g[0], g[1], g[2]);
        t.grid_size = t.threads_per_grid;
        t.grid_origin = metal::uint3(0u);
        t.threadgroup_position_in_grid = metal::uint3(bi[0], bi[1], bi[2]);
        t.threadgroups_per_grid = metal::uint3((g[0] + b[0] - 1u) / b[0], (g[1] + b[1] - 1u) / b[1],
                                               (g[2] + b[2] - 1u) / b[2]);
        t.thread_position_in_threadgroup = metal::uint3(ti[0], ti[1], ti[2]);
        t.threads_per_threadgroup = metal::uint3(real[0], real[1], real[2]);
        t.dispatch_threads_per_threadgroup = metal::uint3(b[0], b[1], b[2]);
        t.thread_index_in_threadgroup = ti[0] + real[0] * (ti[1] + real[1] * ti[2]);
        uint linear = ff_thread_index();
        uint real_total = real[0] * real[1] * real[2];
        uint block_total = b[0] * b[1] * b[2];
        t.thread_index_in_simdgroup = linear & 31u;
        t.simdgroup_index_in_threadgroup = linear >> 5;
        t.simdgroups_per_threadgroup = (real_total + 31u) / 32u;
        t.dispatch_simdgroups_per_threadgroup = (block_total + 31u) / 32u;
        t.threads_per_simdgroup = 32u;
        t.thread_execution_width = 32u;
        t.thread_index_in_quadgroup = linear & 3u;
        t.quadgroup_index_in_threadgroup = linear >> 2;
        t.quadgroups_per_threadgroup = (real_total + 3u) / 4u;
        t.dispatch_quadgroups_per_threadgroup = (block_total + 3u) / 4u;

        uint launched = blockDim.x * blockDim.y * blockDim.z;
        uint warp_first = linear & ~31u;
        uint lanes = launched - warp_first < 32u ? launched - warp_first : 32u;
        uint existing = lanes == 32u ? 0xffffffffu : ((1u << lanes) - 1u);
        uint running = __ballot_sync(existing, t.in_grid);
        if ((linear & 31u) == 0u) {
            ff_warp_masks[linear >> 5] = running;
        }
        __syncwarp(existing);
        return t;
    }
};
